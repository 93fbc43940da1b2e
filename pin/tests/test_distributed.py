import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_process_gloo_training_matches_the_global_batch(tmp_path):
    """torchrun, 2 CPU processes with batch 2 each == 1 process with batch 4 (same compositions, averaged grads),
    and the validation after the epoch, split over the two processes, gives the single process's numbers."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [
        "config=tiny",
        f"out_dir={tmp_path}",
        "train.max_steps=2",
        "train.epochs=1",
        "train.val_every_epochs=1",
        "eval.batch_size=3",
    ]
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "pin.train", *common, "name=ddp", "train.batch_size=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    from pin.train import main

    single = main([*common, "name=single", "train.batch_size=4"])
    a = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_0000002" / "weights.safetensors"))
    b = load_file(str(tmp_path / "single" / "checkpoints" / "step_0000002" / "weights.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    (ddp,) = [json.loads(line) for line in (tmp_path / "ddp" / "validation.jsonl").read_text().splitlines()]
    (one,) = single["validation"]
    assert ddp["num"] == one["num"] > 0 and ddp["step"] == one["step"] == 2
    assert ddp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    for key in ("miou", "miou_s", "miou_m", "miou_l"):  # also the batch-weighted ones: the same eval batches
        for k in (key, f"batch_weighted_{key}"):
            assert ddp[k] == pytest.approx(one[k], abs=1e-6), k
