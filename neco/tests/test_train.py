import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import neco.train as train_mod
from neco.config import config_dir, load_config
from neco.train import main


def _weights(ckpt):
    return {name: load_file(os.path.join(ckpt, f"{name}.safetensors")) for name in ("student", "teacher", "queue")}


def _assert_same(a, b, atol=1e-6):
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], atol=atol, rtol=0, msg=f"{name}.{key}")


def test_train_end_to_end_writes_run(tiny_args, tmp_path):
    out = main(tiny_args + ["optim.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=1"])
    run = out["run_dir"]
    assert len(out["losses"]) == 2 and all(torch.isfinite(torch.tensor(out["losses"])))
    assert os.path.isfile(os.path.join(run, "config.yaml")) and os.path.isfile(os.path.join(run, "log.txt"))
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2]
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert ckpts == ["step_000002"]  # keep_checkpoints=1 pruned step 1; no temporary directory left
    files = set(os.listdir(out["checkpoint"]))
    assert {"student.safetensors", "teacher.safetensors", "optimizer.safetensors", "meta.json"} <= files
    meta = json.load(open(os.path.join(out["checkpoint"], "meta.json")))
    assert meta["step"] == 2 and meta["config"]["name"] == "neco_tiny"
    # the teacher is an EMA of the student, not the student itself
    w = _weights(out["checkpoint"])
    assert not torch.equal(w["student"]["head.mlp.0.weight"], w["teacher"]["head.mlp.0.weight"])


def test_resume_continues_the_same_trajectory(tiny_args, tmp_path):
    tiny_args = tiny_args + ["model.drop_path=0.1"]  # the restored RNG must also reproduce the drop-path draws
    straight = main(tiny_args + ["optim.max_steps=4", f"train.run_dir={tmp_path / 'a'}"])
    main(tiny_args + ["optim.max_steps=2", f"train.run_dir={tmp_path / 'b'}"])
    resumed = main(tiny_args + ["optim.max_steps=4", f"train.run_dir={tmp_path / 'b'}", "train.resume=latest"])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"]), atol=1e-6, rtol=0)
    _assert_same(_weights(straight["checkpoint"]), _weights(resumed["checkpoint"]))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_args, monkeypatch):
    calls = {"n": 0}
    real = train_mod.neco_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "neco_loss", flaky)
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 2.*step_000002"):
        main(tiny_args + ["optim.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=5"])
    run = tiny_args[2].split("=", 1)[1]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000001", "step_000002"]


def test_no_teacher_ablation_uses_the_students_own_outputs_and_skips_the_ema(tiny_args, monkeypatch):
    seen = []
    real = train_mod.neco_loss

    def spy(teacher_global, student_crops, *args, **kwargs):
        seen.append(([t.clone() for t in teacher_global], [s.detach().clone() for s in student_crops[:2]]))
        assert all(not t.requires_grad for t in teacher_global)  # stop-gradient targets
        return real(teacher_global, student_crops, *args, **kwargs)

    monkeypatch.setattr(train_mod, "neco_loss", spy)
    args = ["optim.max_steps=2", "train.save_initial=true", "train.checkpoint_every=1", "train.keep_checkpoints=5"]
    out = main(tiny_args + args + ["loss.use_teacher=false"])
    assert len(seen) == 2
    for targets, student_globals in seen:
        for t, s in zip(targets, student_globals):
            torch.testing.assert_close(t, s, rtol=0, atol=0)
    first = _weights(os.path.join(out["run_dir"], "checkpoints", "step_000000"))
    last = _weights(out["checkpoint"])
    assert first["teacher"].keys() == last["teacher"].keys()
    for key in first["teacher"]:  # no EMA: the teacher stays at the starting weights
        assert torch.equal(first["teacher"][key], last["teacher"][key]), key
    assert not torch.equal(first["student"]["head.mlp.0.weight"], last["student"]["head.mlp.0.weight"])
    from neco.eval import backbone_from_checkpoint

    backbone_from_checkpoint(out["checkpoint"], "student")
    with pytest.raises(ValueError, match=r"without a teacher \(loss.use_teacher=false\).*use weights=student"):
        backbone_from_checkpoint(out["checkpoint"], "teacher")  # it would be the untrained starting weights


def test_trainable_blocks_freeze_the_other_backbone_weights(tiny_args):
    args = ["optim.max_steps=2", "train.save_initial=true", "train.checkpoint_every=1", "train.keep_checkpoints=5"]
    out = main(tiny_args + args + ["optim.trainable_blocks=-1"])  # tiny: 2 blocks -> only block 1 trains
    first = _weights(os.path.join(out["run_dir"], "checkpoints", "step_000000"))
    last = _weights(out["checkpoint"])
    for net in ("student", "teacher"):  # the EMA teacher keeps the frozen weights bit for bit too
        for key, value in first[net].items():
            moved = not torch.equal(value, last[net][key])
            assert moved == key.startswith(("backbone.blocks.1.", "head.")), (net, key)


def test_missing_coco_fails_at_once_naming_path_and_override(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        main([f"data.root={missing}", f"train.run_dir={tmp_path / 'run'}", "train.cpu=true"])
    msg = str(err.value)
    assert str(missing / "train2017") in msg and "data.root=" in msg and "tiny" in msg


def test_default_config_without_weights_fails_naming_the_model(tmp_path, offline_hub):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "coco" / "train2017" / "000000000001.jpg")
    args = [
        f"data.root={tmp_path / 'coco'}",
        f"train.run_dir={tmp_path / 'run'}",
        "train.cpu=true",
        "optim.batch_size=1",
    ]
    with pytest.raises(FileNotFoundError, match="model.name=vit_small_patch14_reg4_dinov2.lvd142m"):
        main(args)


def test_config_errors():
    with pytest.raises(KeyError, match="unknown config key 'optim.lrr'.*optim.lr_backbone") as err:
        load_config(["optim.lrr=1"])
    assert str(err.value).startswith("unknown config key 'optim.lrr'; valid keys: ")  # printed unquoted
    with pytest.raises(KeyError, match=r"^unknown config key 'loss.netwrk' \(did you mean loss.network\?\); valid"):
        load_config(["loss.netwrk=odd_even"])
    with pytest.raises(ValueError, match=r"^loss=3: loss is a section; set its fields, e.g. loss.network=\.\.\.$"):
        load_config(["loss=3"])
    with pytest.raises(FileNotFoundError, match="config 'nope' not found.*tiny"):
        load_config(["--config", "nope"])
    cfg = load_config(["--config", "tiny", "--optim.batch_size", "8", "loss.network=odd_even", "optim.lr_head=1e-4"])
    assert cfg["optim"]["batch_size"] == 8 and cfg["loss"]["network"] == "odd_even"
    assert cfg["optim"]["lr_head"] == 1e-4  # YAML 1.1 would read "1e-4" as a string
    default = load_config([])  # the paper recipe
    assert default["model"]["name"] == "vit_small_patch14_reg4_dinov2.lvd142m" and default["optim"]["batch_size"] == 64
    assert default["data"]["global_size"] == 518 and default["loss"]["queue_length"] == 8192
    for name in sorted(os.listdir(config_dir())):  # ablation switches off in every training config (paper values)
        cfg = load_config(["--config", name])
        if "optim" in cfg:
            assert cfg["loss"]["use_teacher"] is True and cfg["optim"]["trainable_blocks"] is None, name
            assert cfg["loss"]["mask"] == "all", name


def test_released_configs_queue_switch_as_the_reference():
    """train_with_neco.py passes is_queue_usable=False when the key is absent: the official DINOv2 configs set it
    True, the DINO / Leopart / TimeT configs (small/neco_{dino,leopart,timetuning}.yml) do not have it."""
    queue_on = ["dinov2_vits14", "dinov2r_vits14", "dinov2r_xr_vits14", "dinov2_vitb14", "dinov2r_vitb14"]
    queue_on.append("dinov2r_xr_vitb14")
    for name in queue_on:
        assert load_config(["--config", name])["loss"]["use_queue"] is True, name
    for name in ["dino_vits16", "leopart_vits16", "timetuning_vits16"]:
        assert load_config(["--config", name])["loss"]["use_queue"] is False, name


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["all", "fg"])
def test_two_processes_match_one_process(tmp_path, mask):
    """torchrun with 2 gloo processes and the same global batch reproduces the single-process run (with a loss mask:
    the masked mean runs over the selected locations of the whole batch)."""
    args = [
        "--config",
        "tiny",
        "optim.max_steps=2",
        "data.synthetic_images=8",
        "optim.batch_size=2",
        "data.num_local=2",
        f"loss.mask={mask}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533" if mask == "all" else "29534",
        "-m",
        "neco.train",
        *args,
        f"train.run_dir={tmp_path / 'two'}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout + proc.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two processes: AdamW's first steps turn thread-order rounding into 1e-5 moves
    try:
        one = main(args + [f"train.run_dir={tmp_path / 'one'}"])
    finally:
        torch.set_num_threads(threads)
    two = [json.loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one["losses"]), atol=1e-5, rtol=0)
    _assert_same(
        _weights(one["checkpoint"]), _weights(str(tmp_path / "two" / "checkpoints" / "step_000002")), atol=1e-5
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mask", ["all", "fg"])
def test_bf16_step_on_gpu(tiny_args, mask):
    out = main(tiny_args + ["optim.max_steps=2", "train.cpu=false", "train.mixed_precision=bf16", f"loss.mask={mask}"])
    assert all(torch.isfinite(torch.tensor(out["losses"])))


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_keys_and_exits_0(flag, capsys, monkeypatch):
    from neco import export

    monkeypatch.setattr(sys, "argv", ["/venv/bin/neco-export", flag])  # the usage line names the command

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a console script, not `python -m`
    with pytest.raises(SystemExit):
        export.main([flag])
    assert capsys.readouterr().out.startswith("usage: neco-export [key=value")

    for entry in (main, export.main):
        with pytest.raises(SystemExit) as exc:
            entry([flag])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "loss.network = 'bitonic'" in out and "weights = 'student'" in out


def test_resume_with_other_ablation_switches_is_an_error(tiny_args, tmp_path):
    """A no-teacher run resumed without loss.use_teacher=false would restart the EMA from the never-moved teacher;
    another trainable_blocks used to fail deep in torch's optimizer.load_state_dict."""
    run = [f"train.run_dir={tmp_path / 'r'}"]
    main(tiny_args + run + ["optim.max_steps=1", "loss.use_teacher=false", "optim.trainable_blocks=-1"])
    resume = tiny_args + run + ["optim.max_steps=2", "train.resume=latest"]
    with pytest.raises(ValueError, match=r"loss.use_teacher=False, this run has True; resume with"):
        main(resume + ["optim.trainable_blocks=-1"])
    with pytest.raises(ValueError, match=r"optim.trainable_blocks=-1, this run has None"):
        main(resume + ["loss.use_teacher=false"])
    with pytest.raises(ValueError, match=r"loss.mask='all', this run has 'fg'"):
        main(resume + ["loss.use_teacher=false", "optim.trainable_blocks=-1", "loss.mask=fg"])
    assert main(resume + ["loss.use_teacher=false", "optim.trainable_blocks=-1"])["step"] == 2


def test_resume_with_another_seed_crop_count_or_objective_is_an_error_listing_them(tiny_args, tmp_path):
    """Another seed, number of local crops or sorting network resumed silently (another data order and objective);
    all are listed at once, and a resume with the checkpoint's values trains on."""
    run = [f"train.run_dir={tmp_path / 'r'}"]
    main(tiny_args + run + ["optim.max_steps=1", "seed=1", "data.num_local=1", "loss.network=odd_even"])
    resume = tiny_args + run + ["optim.max_steps=2", "train.resume=latest"]
    with pytest.raises(ValueError) as err:
        main(resume)
    assert str(err.value) == (
        f"train.resume: {tmp_path / 'r' / 'checkpoints' / 'step_000001'} was trained with seed=1, this run has 0; "
        "data.num_local=1, this run has 2; loss.network='odd_even', this run has 'bitonic'; resume with the "
        "checkpoint's values (its meta.json config) or start a new run"
    )
    assert main(resume + ["seed=1", "data.num_local=1", "loss.network=odd_even"])["step"] == 2


@pytest.mark.parametrize(
    "bad",
    ["optim.batch_size=0", "optim.batch_size=-4", "optim.epochs=0", "optim.max_steps=0", "train.checkpoint_every=0"],
)
def test_counts_that_must_be_positive_are_errors_before_anything_is_written(tiny_args, bad):
    # batch 0 was a ZeroDivisionError, max_steps=0 trained the whole schedule, checkpoint_every=0 failed after step 1
    key, value = bad.split("=")
    with pytest.raises(ValueError, match=rf"^{key}={value}: expected a positive integer$"):
        main(tiny_args + [bad])
    assert not os.path.exists(tiny_args[2].split("=", 1)[1])


def test_run_dir_checkpoints_are_never_overwritten_or_resumed_wrongly(tiny_args, tmp_path):
    """A fresh start in a run directory holding checkpoints would overwrite them and leave train.resume=latest
    pointing at the old run; resuming with another model, a truncated file, a past end or train.resume=true are
    ValueErrors naming what to change."""
    first = main(tiny_args + ["optim.max_steps=2"])
    saved = _weights(first["checkpoint"])
    config = open(os.path.join(first["run_dir"], "config.yaml")).read()
    with pytest.raises(ValueError, match=r"run already holds checkpoints \(latest .*step_000002\): continue that run"):
        main(tiny_args + ["optim.max_steps=1", "seed=7"])
    resume = tiny_args + ["train.resume=latest"]
    with pytest.raises(ValueError, match=r"step_000002 was trained with model.head_out_dim=32, this run has 16"):
        main(resume + ["model.head_out_dim=16"])
    with pytest.raises(ValueError, match=r"was trained with loss.queue_length=512, this run has 64; resume"):
        main(resume + ["loss.queue_length=64"])
    with pytest.raises(ValueError, match=r"is at step 2, past this run's end at step 1 \(optim.max_steps=1"):
        main(resume + ["optim.max_steps=1"])
    with pytest.raises(ValueError, match=r"^train\.resume=True: expected text \(a path or name\), or null$"):
        main(tiny_args + ["train.resume=true"])
    _assert_same(saved, _weights(first["checkpoint"]), atol=0)
    assert open(os.path.join(first["run_dir"], "config.yaml")).read() == config  # refused runs leave it as it was
    teacher = os.path.join(first["checkpoint"], "teacher.safetensors")
    with open(teacher, "r+b") as f:
        f.truncate(64)
    with pytest.raises(ValueError, match=r"teacher.safetensors is not a readable safetensors file"):
        main(resume + ["optim.max_steps=3"])


def test_optimizer_follows_the_schedules_at_the_global_step(tiny_args, tmp_path, monkeypatch):
    """Every update uses lr / weight decay of its own step (backbone and head groups, decay groups only), also right
    after a resume."""
    from neco.schedules import cosine_schedule

    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            seen.append([(g["lr"], g["weight_decay"]) for g in self.param_groups])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    run = [f"train.run_dir={tmp_path / 'r'}"]
    main(tiny_args + run + ["optim.max_steps=3"])
    main(tiny_args + run + ["optim.max_steps=5", "train.resume=latest"])
    assert len(seen) == 5
    # tiny: 8 images, batch 2 -> 4 steps per epoch, 2 epochs
    lr_backbone = cosine_schedule(1e-4, 0.0, 2, 4)
    lr_head = cosine_schedule(1e-3, 0.0, 2, 4)
    wd = cosine_schedule(0.04, 0.5, 2, 4)
    for step, groups in enumerate(seen):
        expected = [
            (lr_backbone[step], wd[step]),
            (lr_backbone[step], 0.0),
            (lr_head[step], wd[step]),
            (lr_head[step], 0.0),
        ]
        np.testing.assert_allclose(groups, expected, rtol=1e-12, atol=0, err_msg=f"step {step}")


def test_each_global_crop_has_its_own_queue_of_its_teacher_patches(tiny_args, monkeypatch):
    """At the first step the queues are empty before the push: bank c holds patches of teacher crop c only."""
    seen = []
    real = train_mod.neco_loss

    def spy(teacher_global, student_crops, *args, **kwargs):
        seen.append(([t.detach().clone() for t in teacher_global], [r.clone() for r in kwargs["references"]]))
        return real(teacher_global, student_crops, *args, **kwargs)

    monkeypatch.setattr(train_mod, "neco_loss", spy)
    main(tiny_args + ["optim.max_steps=2"])
    teacher, banks = seen[0]
    assert len(banks) == 2
    for c in range(2):
        rows = teacher[c].reshape(-1, teacher[c].shape[-1])
        assert len(banks[c]) == 10 * 2  # queue_per_image * batch
        same = (banks[c][:, None] == rows[None]).all(-1)  # (entries, patches of crop c)
        assert same.any(1).all(), c  # every entry is a patch of teacher crop c
        assert len({int(i) for i in same.float().argmax(1)}) == len(banks[c])  # without repeats
    _, second = seen[1]
    assert [len(b) for b in second] == [40, 40]  # newest first, the first step's entries behind
    for c in range(2):
        torch.testing.assert_close(second[c][20:], banks[c], rtol=0, atol=0)


def test_cli_prints_a_non_finite_loss_as_one_line(tiny_args, monkeypatch):
    monkeypatch.setattr(train_mod, "neco_loss", lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True))
    monkeypatch.setattr(sys, "argv", ["neco-train", *tiny_args, "optim.max_steps=1"])
    with pytest.raises(SystemExit) as exc:
        train_mod.cli()
    assert str(exc.value.code).startswith("neco-train: error: non-finite loss nan at step 0; stopping. Last good")


def test_resume_auto_starts_a_new_run_then_continues_as_latest(tiny_args, tmp_path, monkeypatch):
    """train.resume=auto, for a requeued job that always passes the same command: a new run while the run folder
    holds no checkpoint, else exactly train.resume=latest (same losses, weights and metrics.jsonl)."""
    import shutil

    straight = main(tiny_args + ["optim.max_steps=4", f"train.run_dir={tmp_path / 'straight'}"])
    auto = tiny_args + ["optim.max_steps=4", "train.checkpoint_every=2", "train.resume=auto"]
    real, calls = train_mod.neco_loss, []

    def preempted(*args, **kwargs):  # the job is stopped during step 4, after step 3 was logged
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "neco_loss", preempted)
    with pytest.raises(KeyboardInterrupt):
        main(auto)  # an empty run folder: a new run from step 0
    monkeypatch.setattr(train_mod, "neco_loss", real)
    run = tmp_path / "run"
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000002"]
    shutil.copytree(run, tmp_path / "latest")
    resumed = main(auto)
    latest = main(tiny_args + ["optim.max_steps=4", f"train.run_dir={tmp_path / 'latest'}", "train.resume=latest"])
    assert resumed["losses"] == latest["losses"]
    _assert_same(_weights(resumed["checkpoint"]), _weights(latest["checkpoint"]), atol=0)
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"]), atol=1e-6, rtol=0)
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["loss"] for r in logged] == pytest.approx(straight["losses"], abs=1e-6, rel=0)


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tiny_args, tmp_path):
    """The checkpoints past a resume's step belong to an abandoned trajectory: they move to checkpoints/abandoned/,
    so that pruning keeps the new run's own and train.resume=auto continues it."""
    run = tmp_path / "run"
    base = tiny_args + ["train.checkpoint_every=1"]
    main(base + ["optim.max_steps=4", "train.keep_checkpoints=null"])
    resume = f"train.resume={run / 'checkpoints' / 'step_000001'}"
    main(base + ["optim.max_steps=3", "train.keep_checkpoints=1", resume])
    assert sorted(os.listdir(run / "checkpoints")) == ["abandoned", "step_000003"]
    assert sorted(os.listdir(run / "checkpoints" / "abandoned")) == ["step_000002", "step_000003", "step_000004"]
    assert "set aside 3 checkpoints past step 1 in" in (run / "log.txt").read_text()
    main(base + ["optim.max_steps=6", "train.resume=auto"])
    assert f"resumed from {run / 'checkpoints' / 'step_000003'} at step 3" in (run / "log.txt").read_text()
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(run / "checkpoints")) == ["abandoned", "step_000004", "step_000005", "step_000006"]


def test_set_aside_moves_the_later_steps_and_replaces_an_older_copy(tmp_path):
    """Steps past the resume's move to checkpoints/abandoned/ (an older copy there replaced), which is no step."""
    from neco.checkpoint import list_checkpoints, resolve_resume, set_aside_checkpoints
    from neco.eval import resolve_checkpoint

    for name in ("step_000001", "step_000002", "step_000010", "abandoned/step_000002/old"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    moved = set_aside_checkpoints(str(tmp_path), 1)
    assert [os.path.basename(p) for p in moved] == ["step_000002", "step_000010"]
    assert not (tmp_path / "checkpoints" / "abandoned" / "step_000002" / "old").exists()
    first = [str(tmp_path / "checkpoints" / "step_000001")]
    assert list_checkpoints(str(tmp_path)) == first == [resolve_resume("latest", str(tmp_path))]
    assert resolve_checkpoint(str(tmp_path)) == first[0]
    assert set_aside_checkpoints(str(tmp_path), 1) == []


def test_latest_checkpoint_is_the_highest_step_by_number(tmp_path):
    """step_1000000 sorts before step_999999 as text: resume, neco-eval / neco-export and pruning go by the number."""
    from neco.checkpoint import list_checkpoints, resolve_resume
    from neco.eval import resolve_checkpoint

    for step in (999999, 1000000, 2):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:06d}" / "meta.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp_step_1000001").mkdir()  # an unfinished checkpoint is none
    order = [os.path.join(tmp_path, "checkpoints", f"step_{s:06d}") for s in (2, 999999, 1000000)]
    assert list_checkpoints(str(tmp_path)) == order  # save_checkpoint prunes list_checkpoints(run)[:-keep]
    for latest in (resolve_resume("latest", str(tmp_path)), resolve_resume("auto", str(tmp_path))):
        assert latest == order[-1]
    assert resolve_checkpoint(str(tmp_path)) == order[-1]


def test_tensorboard_after_a_resume_from_an_older_step_shows_one_value_per_step(tiny_args, tmp_path, monkeypatch):
    """The events of the abandoned steps stay in the first file; the resumed writer's purge_step hides them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    base = tiny_args + ["train.tensorboard=true", "train.checkpoint_every=1", "train.keep_checkpoints=null"]
    first = main(base + ["optim.max_steps=4"])
    real = train_mod.neco_loss
    monkeypatch.setattr(train_mod, "neco_loss", lambda *a, **k: real(*a, **k) + 1.0)  # another trajectory
    second = main(base + ["optim.max_steps=4", f"train.resume={run / 'checkpoints' / 'step_000002'}"])
    events = EventAccumulator(str(run / "neco_tiny"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    expected = first["losses"][:2] + second["losses"][2:]
    assert [value for _, value in logged] == pytest.approx(expected, abs=1e-6, rel=0)


def test_tensorboard_without_the_package_is_an_error_before_the_run_starts(tiny_args, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"train.tensorboard=true needs TensorBoard: pip install"):
        main(tiny_args + ["train.tensorboard=true"])
    assert not (tmp_path / "run").exists()


def test_a_crash_while_step_0_is_saved_again_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """A run resumed at step 0 (train.save_initial) saves step_000000 again: a kill while the old copy is deleted
    must leave a complete step_000000 for train.resume=auto, not one missing files."""
    import shutil

    import neco.checkpoint as ckpt

    student = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(student.parameters())
    ckpt.save_checkpoint(str(tmp_path), 0, {"student": student}, opt, {"losses": []})
    real = shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes one file of a checkpoint folder, then the process dies
        if os.path.isdir(path) and "step_000000" in os.path.basename(path):
            os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(str(tmp_path), 0, {"student": student}, opt, {"losses": []})
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    found = ckpt.resolve_resume("auto", str(tmp_path))
    assert found == ckpt.checkpoint_dir(str(tmp_path), 0)
    assert ckpt.load_checkpoint(found, {"student": student}, opt)["step"] == 0


def test_trim_metrics_replaces_the_file_only_once_rewritten(tmp_path, monkeypatch):
    """A kill while the trimmed records are written (here: at the rename) leaves the file as it was (it was rewritten
    in place, so such a kill lost records); a file with nothing past the step is not rewritten."""
    import neco.train as module

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(lines))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        module.trim_metrics(str(path), 2)
    assert path.read_text() == "".join(lines)
    module.trim_metrics(str(path), 3)  # nothing to drop: no rename
    monkeypatch.undo()
    module.trim_metrics(str(path), 2)
    assert path.read_text() == "".join(lines[:2])


def test_mixed_precision_on_cpu_is_said_to_train_in_float32(tiny_args, tmp_path):
    """A CPU run drops train.mixed_precision: the log says so instead of nothing."""
    main(tiny_args + ["optim.max_steps=1", "train.cpu=true", "train.mixed_precision=bf16"])
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "train.mixed_precision=bf16 needs a GPU: this CPU run trains in float32" in log


def test_missing_data_fails_before_the_mixed_precision_warning(tmp_path, monkeypatch):
    """Without data, neco-train's only line is the error: the CPU mixed_precision warning comes after the data check."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="train2017 images not found"):
        main([f"data.root={tmp_path / 'nodata'}", f"train.run_dir={run}", "train.mixed_precision=bf16"])
    assert "needs a GPU" not in (run / "log.txt").read_text()


def test_tensorboard_of_a_run_restarted_at_step_0_shows_one_value_per_step(tiny_args, tmp_path):
    """A run killed before its first checkpoint and started again (train.resume=auto) restarts at step 0: its writer
    hides the first attempt's events too (no purge_step at step 0 showed steps 1, 2, 1, 2)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = tiny_args + ["train.tensorboard=true", "optim.max_steps=2", "train.resume=auto"]
    main(args)
    shutil.rmtree(run / "checkpoints")  # the first attempt was killed before it wrote a checkpoint
    main(args)
    events = EventAccumulator(str(run / "neco_tiny"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
