import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_process_gloo_training_matches_the_global_batch(tmp_path):
    """torchrun, 2 CPU processes with batch 2 each == 1 process with batch 4 (same compositions, averaged grads)."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["config=tiny", f"out_dir={tmp_path}", "train.max_steps=1", "train.epochs=1"]
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "pin.train", *common, "name=ddp", "train.batch_size=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    from pin.train import main

    main([*common, "name=single", "train.batch_size=4"])
    a = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_0000001" / "weights.safetensors"))
    b = load_file(str(tmp_path / "single" / "checkpoints" / "step_0000001" / "weights.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
