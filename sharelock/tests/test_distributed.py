"""Two real gloo processes (accelerate launch --multi_gpu on CPU) against one process with gradient accumulation."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sharelock import train
from sharelock.store import FeatureWriter


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    rng = np.random.default_rng(0)
    n = 72  # 8 validation + 64 training = 4 batches of 16: epochs align for 1 and 2 processes
    v = rng.normal(size=(n, 6)).astype(np.float32)
    t = (v @ rng.normal(size=(6, 10)) + 0.1 * rng.normal(size=(n, 10))).astype(np.float32)
    ids = [str(i) for i in range(n)]
    for name, feats, modality in (("v", v, "image"), ("t", t, "text")):
        with FeatureWriter(tmp_path / name, "m", modality, feats.shape[1]) as w:
            w.add(ids, feats)
    datasets = json.dumps([{"vision": str(tmp_path / "v"), "text": str(tmp_path / "t")}])
    common = [f"data.datasets={datasets}", "data.val_size=8", "model.hidden_dim=16", "model.dropout=0.0",
              "optim.batch_size=16", "optim.max_steps=6", "optim.warmup_steps=2", "val_check_interval=1000",
              "checkpoint_every=6"]  # fmt: skip
    train.main([f"run_dir={tmp_path / 'one'}", "optim.accumulate_grad_batches=2", *common])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "sharelock.train", f"run_dir={tmp_path / 'two'}",
           "optim.accumulate_grad_batches=1", *common]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step_000006" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "checkpoints" / "step_000006" / "model.safetensors"))
    # DDP averages the two ranks' gradients = accumulating the same two micro-batches in one process. BatchNorm running
    # statistics differ (rank 0's buffers are broadcast), the trained parameters do not.
    for key in one:
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-4)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_two_feature_processes_share_the_work(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m sharelock.precompute` on CPU: two ranks, one shard series
    each, every caption exactly once."""
    from sharelock.tiny import build_tiny_llama, build_word_tokenizer

    captions = {f"{i:04d}": f"caption number {i} " + "word " * (i % 5) for i in range(30)}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    tokenizer = build_word_tokenizer(captions.values())
    build_tiny_llama(len(tokenizer), hidden_size=16).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # the documented command alone must form one two-process job
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "sharelock.precompute", "modality=text",
           "source.type=captions", f"source.path={tmp_path / 'captions.json'}", f"language.model={tmp_path / 'llm'}",
           f"out={tmp_path / 'store'}", "shard_size=4"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from sharelock.store import FeatureStore

    ranks = {p.name[: len("shard_r000")] for p in (tmp_path / "store").glob("shard_*.json")}
    assert ranks == {"shard_r000", "shard_r001"}
    assert sorted(FeatureStore(tmp_path / "store").ids) == sorted(captions)
