import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from counting.train import main


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """2 gloo processes with half batches each train exactly like one process (same data, masks, shots)."""
    single = main(["--config", "tiny", f"output_dir={tmp_path}", "name=one", "train.max_steps=2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "counting.train"]
    cmd += ["--config", "tiny", f"output_dir={tmp_path}", "name=two", "train.max_steps=2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "2 processes" in log
    logged = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", log)]
    assert logged == pytest.approx(single["losses"], rel=1e-6)  # the all-reduced loss equals the single-process loss
    a = load_file(str(tmp_path / "one/checkpoints/step_000002/model.safetensors"))
    b = load_file(str(tmp_path / "two/checkpoints/step_000002/model.safetensors"))
    for key in a:
        if key.endswith("kv.bias"):
            # the key bias has an exactly-zero true gradient (softmax ignores a shift of all logits): Adam turns
            # its rounding noise into +-lr steps, so only the value half is comparable
            a[key], b[key] = a[key][a[key].numel() // 2 :], b[key][b[key].numel() // 2 :]
        assert torch.allclose(a[key], b[key], atol=1e-5), key
