"""In-training VOC k-means validation (spec section 7): schedule, records, no effect on training, start-up errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from neco.config import config_dir, load_config
from neco.train import main
from neco.validation import is_due, validation_config

VAL = ["val.ks=[6,4,21]", "val.batch_size=2", "val.batches=2", "val.input_size=98", "val.nredo=1", "val.niter=10"]


def write_voc(root, n=5, size=64):
    """A Pascal VOC folder as neco-eval reads it: images/, SegmentationClass/, sets/val.txt (labels 0..20, 255)."""
    rng = np.random.default_rng(0)
    for folder in ("images", "SegmentationClass", "sets"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(n)]
    (root / "sets" / "val.txt").write_text("\n".join(names) + "\n")
    for name in names:
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(1, 21)
        mask[size // 4, :] = 255  # a boundary line
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8) + (mask[..., None] % 21 * 9).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.jpg")
        Image.fromarray(mask, "L").save(root / "SegmentationClass" / f"{name}.png")
    return root


def _checkpoint_files(ckpt):
    weights = {n: load_file(os.path.join(ckpt, f"{n}.safetensors")) for n in ("student", "teacher", "queue", "rng_0")}
    meta = json.load(open(os.path.join(ckpt, "meta.json")))
    meta.pop("config")
    return weights, meta


def test_every_shipped_training_config_has_validation_off():
    for name in sorted(os.listdir(config_dir())):
        cfg = load_config(["--config", name])
        if "optim" in cfg:
            assert cfg["val"]["root"] is None and validation_config(cfg) is None, name
            assert cfg["val"]["ks"] == [500, 300, 21] and cfg["val"]["batches"] == 20, name


def test_validation_schedule():
    v = {"at_start": True, "every_epochs": 1, "every_steps": 3}
    assert [d for d in range(9) if is_due(v, d, iters_per_epoch=4)] == [0, 3, 4, 6, 8]
    v = {"at_start": False, "every_epochs": 2, "every_steps": None}
    assert [d for d in range(13) if is_due(v, d, iters_per_epoch=3)] == [6, 12]


def test_validation_records_at_the_right_steps_and_leaves_training_unchanged(tiny_args, tmp_path):
    root = write_voc(tmp_path / "VOCSegmentation")
    common = tiny_args[:2] + tiny_args[3:] + ["model.drop_path=0.1", "train.checkpoint_every=3"]
    # 8 images, batch 2: 4 steps per epoch, 2 epochs; validation at the start, every 3 steps and at epoch ends
    val_args = [f"val.root={root}", "val.at_start=true", "val.every_steps=3", *VAL]
    on = main(common + [f"train.run_dir={tmp_path / 'on'}", *val_args])
    off = main(common + [f"train.run_dir={tmp_path / 'off'}"])
    assert on["step"] == off["step"] == 8
    assert on["losses"] == off["losses"]  # bit for bit: validation draws nothing from the training RNG stream
    ckpts = sorted(os.listdir(os.path.join(on["run_dir"], "checkpoints")))
    assert ckpts == sorted(os.listdir(os.path.join(off["run_dir"], "checkpoints")))
    for name in ckpts:
        w_on, meta_on = _checkpoint_files(os.path.join(on["run_dir"], "checkpoints", name))
        w_off, meta_off = _checkpoint_files(os.path.join(off["run_dir"], "checkpoints", name))
        assert meta_on == meta_off
        for net in w_on:
            assert w_on[net].keys() == w_off[net].keys()
            for key in w_on[net]:
                assert torch.equal(w_on[net][key], w_off[net][key]), (name, net, key)

    records = [json.loads(line) for line in open(os.path.join(on["run_dir"], "metrics.jsonl"))]
    val = [r for r in records if "val_miou_k6" in r]
    assert [r["step"] for r in val] == [0, 3, 4, 6, 8]
    assert [r["epoch"] for r in val] == [0, 0.75, 1, 1.5, 2]
    for r in val:
        assert {k for k in r if k.startswith("val_miou_k")} == {"val_miou_k6", "val_miou_k4", "val_miou_k21"}
        assert all(0 <= r[f"val_miou_k{k}"] <= 1 for k in (6, 4, 21)) and r["val_images"] == 4
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    off_records = [json.loads(line) for line in open(os.path.join(off["run_dir"], "metrics.jsonl"))]
    assert [r["loss"] for r in off_records] == [r["loss"] for r in train_records]
    assert "val k-means mIoU" in open(os.path.join(on["run_dir"], "log.txt")).read()


def test_validation_on_the_teacher_and_without_a_teacher(tiny_args, tmp_path):
    root = write_voc(tmp_path / "VOCSegmentation")
    out = main(tiny_args + ["optim.max_steps=4", f"val.root={root}", "val.weights=teacher", *VAL])
    records = [json.loads(line) for line in open(os.path.join(out["run_dir"], "metrics.jsonl"))]
    assert [r["step"] for r in records if "val_miou_k6" in r] == [4]
    with pytest.raises(ValueError, match="val.weights=teacher but loss.use_teacher=false"):
        main(tiny_args + [f"val.root={root}", "val.weights=teacher", "loss.use_teacher=false", *VAL])


def test_missing_val_root_fails_before_training(tiny_args, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        main(tiny_args + [f"val.root={missing}", *VAL])
    assert f"val.root={str(missing)!r}" in str(err.value) and "val.root=null" in str(err.value)
    run = tiny_args[2].split("=", 1)[1]
    assert not any(os.path.exists(os.path.join(run, name)) for name in ("metrics.jsonl", "checkpoints"))
    root = write_voc(tmp_path / "VOCSegmentation", n=1)
    with pytest.raises(ValueError, match=r"val.ks=\[500, 300, 21\]: 1 val images give 49 patch tokens"):
        main(tiny_args + [f"val.root={root}"])
    with pytest.raises(ValueError, match="val.every_epochs and val.every_steps are null"):
        main(tiny_args + [f"val.root={root}", "val.every_epochs=null", *VAL])
    for bad, message in [
        ("val.pca_dim=0", "val.pca_dim must be a positive integer, got 0"),
        ("val.nredo=0", "val.nredo must be a positive integer, got 0"),
        ("val.seed=-1", "val.seed must be an integer >= 0, got -1"),
        ("val.every_steps=true", "val.every_steps must be a positive integer or null, got True"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            main(tiny_args + [f"val.root={root}", *VAL, bad])


def test_resume_from_an_older_checkpoint_logs_each_step_once(tiny_args, tmp_path):
    """metrics.jsonl is appended to: a restart at step S first drops the training and validation records after S (all
    of them at step 0, whose validation runs again), so the file ends as the one of an uninterrupted run."""
    val = [f"val.root={write_voc(tmp_path / 'voc')}", "val.at_start=true", "val.every_steps=2", *VAL]
    args = tiny_args + val + ["optim.max_steps=3", "train.checkpoint_every=1", "train.save_initial=true"]
    run = main(args + ["train.keep_checkpoints=5"])["run_dir"]

    def records():
        return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]

    straight = records()
    kinds = [(r["step"], "val_miou_k6" in r) for r in straight]
    assert kinds == [(0, True), (1, False), (2, False), (2, True), (3, False)]
    for step in (1, 0):
        resume = f"train.resume={os.path.join(run, 'checkpoints', f'step_{step:06d}')}"
        main(args + ["train.keep_checkpoints=5", resume])
        assert [(r["step"], "val_miou_k6" in r) for r in records()] == kinds, step
        losses = [r["loss"] for r in records() if "loss" in r]
        assert losses == pytest.approx([r["loss"] for r in straight if "loss" in r], abs=1e-6, rel=0)


def test_a_run_killed_in_the_validation_after_its_checkpoint_validates_that_step_on_resume(tiny_args, tmp_path):
    """The validation after checkpoint S runs again when train.resume=auto continues from S without its record (the
    job was killed during it), so metrics.jsonl ends as the one of an uninterrupted run."""
    val = [f"val.root={write_voc(tmp_path / 'voc')}", "val.every_steps=2", *VAL]
    args = tiny_args + val + ["optim.max_steps=3", "train.checkpoint_every=1", "train.resume=auto"]
    run = main(args)["run_dir"]

    def records():
        return [(r["step"], "val_miou_k6" in r) for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))]

    straight = records()
    assert straight == [(1, False), (2, False), (2, True), (3, False)]
    for name in ("step_000003", "abandoned"):  # killed during the validation at step 2 (its line cut short)
        shutil.rmtree(os.path.join(run, "checkpoints", name), ignore_errors=True)
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write("\n".join(lines[:2]) + "\n" + lines[2][:20])
    main(args)
    assert records() == straight


SLOW_RANK_1 = """
import os, sys, time
import neco.train as train
real = train.validated
def validated(run_dir, step):  # rank 1 descheduled just before it reads metrics.jsonl
    if os.environ["RANK"] == "1":
        time.sleep(6)
    return real(run_dir, step)
train.validated = validated
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_two_processes_take_the_same_step_0_validation_decision(tmp_path):
    """Every process decides whether to validate at its start step before the main one can write the record: a rank
    that read metrics.jsonl after rank 0 had appended it skipped the validation's barrier and the run hung."""
    script = tmp_path / "worker.py"
    script.write_text(SLOW_RANK_1)
    args = ["--config", "tiny", "optim.max_steps=1", "data.synthetic_images=8", "optim.batch_size=2"]
    args += ["data.num_local=2", f"train.run_dir={tmp_path / 'run'}", f"val.root={write_voc(tmp_path / 'voc')}", *VAL]
    args += ["val.at_start=true", "val.every_steps=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537"]
    proc = subprocess.run(
        cmd + [str(script), *args], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(r["step"], "val_miou_k6" in r) for r in records] == [(0, True), (1, False)]
