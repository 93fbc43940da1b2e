import json
import os
import socket
import subprocess
import sys

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CENTER_WORKER = """
import sys, torch, torch.distributed as dist
from dora.losses import DoRALoss
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(rank)
teacher = torch.randn(2, 3, 4) + rank  # different outputs per process
loss_fn = DoRALoss(4, 2)
loss_fn(torch.zeros(2, 6, 4), torch.zeros(1, 2, 3, 4), teacher, 0)
torch.save({"teacher": teacher, "center": loss_fn.center}, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_center_is_averaged_over_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(CENTER_WORKER)
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path)], env=env) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    mean = torch.cat([r0["teacher"], r1["teacher"]]).reshape(-1, 4).mean(0, keepdim=True)
    torch.testing.assert_close(r0["center"], 0.1 * mean)
    torch.testing.assert_close(r1["center"], 0.1 * mean)


TRAIN_WORKER = """
import os, sys, torch
from dora import train
first = []
def ema_update(student, teacher, momentum):  # records the teacher each process starts from (before any EMA)
    if not first:
        first.append(1)
        torch.save({k: v.clone() for k, v in teacher.state_dict().items()}, f"{OUT}/teacher{os.environ['RANK']}.pt")
    return EMA(student, teacher, momentum)
OUT, EMA, train.ema_update = sys.argv.pop(1), train.ema_update, ema_update
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    from dora.synthetic import write_walking_video

    video = write_walking_video(tmp_path / "walk.mp4", num_frames=40, size=48)
    run = tmp_path / "run"
    script = tmp_path / "train_worker.py"
    script.write_text(TRAIN_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(script),
        str(tmp_path),
        "--config",
        "tiny",
        f"run_dir={run}",
        f"data.videos=[{video}]",
        "data.batch_size_per_gpu=1",
        "optim.epochs=1",
        "optim.steps_per_epoch=2",
    ]
    if not torch.cuda.is_available():  # the shipped configs say cpu: false; without CUDA they still form one gloo job
        cmd.append("cpu=false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "rng_0.json").is_file() and (ckpt / "rng_1.json").is_file()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["loss"] == r["loss"] for r in records)
    assert "2 processes" in (run / "log.txt").read_text()
    # every process starts from the same teacher (each built its networks under its own seed)
    t0, t1 = (torch.load(tmp_path / f"teacher{r}.pt", weights_only=True) for r in (0, 1))
    assert t0.keys() == t1.keys()
    for k in t0:
        torch.testing.assert_close(t0[k], t1[k], rtol=0, atol=0)
