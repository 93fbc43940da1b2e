import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dora import train
from dora.config import load_config, run_cli
from dora.losses import DINOLoss, DoRALoss
from dora.models import build_network
from dora.train import (
    cancel_last_layer_gradients,
    clip_gradients,
    dino_step,
    dora_step,
    ema_update,
    param_groups,
)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from dora.synthetic import write_walking_video

    return write_walking_video(tmp_path_factory.mktemp("walk") / "walk.mp4", num_frames=60, size=48)


def tiny_args(run_dir, video, *extra):
    return ["--config", "tiny", f"run_dir={run_dir}", f"data.videos=[{video}]", "model.drop_path_rate=0.1", *extra]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_straight_run(tmp_path, video):
    straight = tmp_path / "straight"
    s = train.main(tiny_args(straight, video))
    assert s["steps"] == 4  # 2 epochs x 2 steps, across an epoch boundary (last layer frozen in epoch 0)
    split = tmp_path / "split"
    train.main(tiny_args(split, video, "optim.max_steps=2"))
    assert (split / "checkpoints" / "step_000002" / "rng_0.json").is_file()
    train.main(tiny_args(split, video, "resume=latest"))
    a, b = losses(straight), losses(split)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, abs=1e-6)
    for name in ("student", "teacher", "loss"):
        sa = load_file(str(straight / "checkpoints" / "step_000004" / f"{name}.safetensors"))
        sb = load_file(str(split / "checkpoints" / "step_000004" / f"{name}.safetensors"))
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0)
    # resuming mid-epoch (step 1 of epoch 0) continues the same trajectory too
    mid = tmp_path / "mid"
    train.main(tiny_args(mid, video, "optim.max_steps=1"))
    assert (mid / "checkpoints" / "step_000001").is_dir()
    train.main(tiny_args(mid, video, "resume=latest"))
    assert losses(mid) == pytest.approx(a, abs=1e-6)
    sa = load_file(str(straight / "checkpoints" / "step_000004" / "teacher.safetensors"))
    sm = load_file(str(mid / "checkpoints" / "step_000004" / "teacher.safetensors"))
    for k in sa:
        torch.testing.assert_close(sa[k], sm[k], atol=1e-6, rtol=0)
    # only the newest checkpoints are kept, written atomically, with the resolved config
    kept = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert kept == ["step_000002", "step_000004"]
    state = json.loads((straight / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["data"]["videos"] == [str(video)]
    assert (straight / "config.yaml").is_file() and (straight / "log.txt").is_file()


def test_loader_workers_keep_the_trajectory(tmp_path, video):
    """Persistent loader workers (kept over epochs that stop before the sampler's end, with batches in flight) and a
    mid-epoch resume through them give the losses of the in-process loader: seeds travel with the clip ids."""
    inline = train.main(tiny_args(tmp_path / "inline", video, "data.num_workers=0"))
    workers = train.main(tiny_args(tmp_path / "workers", video, "data.num_workers=2"))
    assert inline["steps"] == workers["steps"] == 4
    assert losses(tmp_path / "workers") == pytest.approx(losses(tmp_path / "inline"), abs=1e-6)
    resumed = tmp_path / "resumed"
    train.main(tiny_args(resumed, video, "data.num_workers=2", "optim.max_steps=1"))
    train.main(tiny_args(resumed, video, "data.num_workers=2", "resume=latest"))
    assert losses(resumed) == pytest.approx(losses(tmp_path / "inline"), abs=1e-6)


def test_milestones_follow_the_reference_saveckp_freq():
    from dora.checkpoint import is_milestone

    # reference: after 0-based epoch e, checkpoint{e:04}.pth is kept when e % 20 == 0 (epochs 1, 21, 41, ... done)
    kept = [s for s in range(1, 100 * 10 + 1) if is_milestone(s, 10, 20)]
    assert kept == [10, 210, 410, 610, 810]
    assert not any(is_milestone(s, 10, None) or is_milestone(s, 10, 0) for s in range(1, 1001))
    assert not is_milestone(0, 10, 20) and not is_milestone(215, 10, 20)


def test_prune_keeps_the_newest_and_the_milestones(tmp_path):
    from dora.checkpoint import prune_checkpoints

    def make(steps):
        for s in steps:
            d = tmp_path / "checkpoints" / f"step_{s:06d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "state.json").write_text("{}")

    def left():
        return sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").iterdir())

    make(range(5, 65, 5))  # 5 steps per epoch: ends of epochs 1 .. 12
    prune_checkpoints(tmp_path, 2, keep_every_epochs=4, steps_per_epoch=5)
    assert left() == [5, 25, 45, 55, 60]  # 0-based epochs 0, 4, 8, plus the 2 newest
    prune_checkpoints(tmp_path, 2)  # without milestones: only the newest
    assert left() == [55, 60]


def test_prune_decides_milestones_by_what_each_checkpoint_recorded(tmp_path):
    from dora.checkpoint import prune_checkpoints

    for s in range(5, 65, 5):  # written with 5 steps per epoch and keep_every_epochs 4
        d = tmp_path / "checkpoints" / f"step_{s:06d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"steps_per_epoch": 5, "config": {"keep_every_epochs": 4}}))
    # a resume with another epoch length (another process count) or with milestones off keeps the old ones
    prune_checkpoints(tmp_path, 1, keep_every_epochs=None, steps_per_epoch=7)
    assert sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").iterdir()) == [5, 25, 45, 60]


def test_training_keeps_milestone_checkpoints(tmp_path, video):
    run = tmp_path / "run"
    extra = ("optim.epochs=3", "checkpoint_every=100", "keep_checkpoints=1", "keep_every_epochs=2")
    train.main(tiny_args(run, video, *extra))
    # 2 steps per epoch; epochs end at steps 2, 4, 6; 0-based epochs 0 and 2 are milestones
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000006"]
    # resumed with milestones off: the kept ones stay (they used to be deleted by the next prune)
    train.main(tiny_args(run, video, *extra[1:3], "optim.epochs=4", "keep_every_epochs=null", "resume=latest"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000006", "step_000008"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, video, monkeypatch):
    run = tmp_path / "run"
    train.main(tiny_args(run, video, "optim.max_steps=2"))
    monkeypatch.setattr(DoRALoss, "forward", lambda self, *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="step_000002"):
        train.main(tiny_args(run, video, "resume=latest"))
    assert (run / "checkpoints" / "step_000002" / "student.safetensors").is_file()


def test_bad_config_and_inputs(tmp_path):
    with pytest.raises(KeyError, match="optim.lr") as err:
        load_config(["--config", "tiny", "optim.lrr=1"])
    assert str(err.value).startswith("unknown config key 'optim.lrr' (did you mean optim.lr or optim.min_lr?)")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(["--config", "nope.yaml"])
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        train.main(tiny_args(tmp_path / "r", tmp_path / "missing.mp4"))
    cfg = load_config(["--config", "tiny", "optim.lr=1e-4", "--data.step", "5"])
    assert cfg["optim"]["lr"] == 1e-4 and cfg["data"]["step"] == 5


def test_overrides_of_the_wrong_kind_are_errors_naming_the_key(tmp_path):
    """A bare string for a list key (read letter by letter before), a string for a number, a scalar for a section,
    anything but true/false for a flag, invalid YAML in an override or a file."""
    with pytest.raises(ValueError, match=r"data.videos='Venice.mp4': expected a list, e.g. data.videos=\[Venice.mp4\]"):
        load_config(["--config", "tiny", "data.videos=Venice.mp4"])
    with pytest.raises(ValueError, match="data.batch_size_per_gpu='abc': expected a number"):
        load_config(["--config", "tiny", "data.batch_size_per_gpu=abc"])
    with pytest.raises(ValueError, match="data=3: data is a section"):
        load_config(["--config", "tiny", "data=3"])
    with pytest.raises(ValueError, match="tasks='knn': expected a list"):
        load_config(["tasks=knn"], default="eval.yaml")
    with pytest.raises(ValueError, match="model.norm_last_layer='flase': expected true or false"):
        load_config(["--config", "tiny", "model.norm_last_layer=flase"])  # a non-empty string: true
    with pytest.raises(ValueError, match="cpu=1: expected true or false"):
        load_config(["--config", "tiny", "cpu=1"])
    with pytest.raises(ValueError, match=r"^cannot parse '\[x' as a YAML value: expected ',' or '\]'"):
        load_config(["--config", "tiny", "name=[x"])  # a yaml.YAMLError printed a multi-line traceback before
    (tmp_path / "mine.yaml").write_text("name: [x\n")
    with pytest.raises(ValueError, match=r"mine\.yaml is not valid YAML \(.*expected ',' or '\]'"):
        load_config(["--config", str(tmp_path / "mine.yaml")])
    cfg = load_config(["--config", "tiny", "augment.global_blur_p=[1.0, 0.1]", "optim.max_steps=3", "resume=latest"])
    assert cfg["augment"]["global_blur_p"] == [1.0, 0.1] and cfg["optim"]["max_steps"] == 3
    assert load_config(["--config", "tiny", "name=2024"])["name"] == "2024"  # a string key keeps a string


def test_config_yaml_quirks(tmp_path):
    """YAML 1.1 reads ``no`` as False and ``1e-3`` as a string, in files as on the command line."""
    from dora.config import config_path

    text = config_path("tiny").read_text().replace("lr: 5.0e-4", "lr: 1e-3").replace('precision: "no"', "precision: no")
    assert "lr: 1e-3" in text and "mixed_precision: no\n" in text
    user = tmp_path / "user.yaml"
    user.write_text(text)
    cfg = load_config(["--config", str(user)])
    assert cfg["optim"]["lr"] == 1e-3 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["optim"]["mixed_precision"] == "no"
    cfg = load_config(["--config", "tiny", "optim.mixed_precision=no", "optim.min_lr=2E-6", "name=1e3x"])
    assert cfg["optim"]["mixed_precision"] == "no" and cfg["optim"]["min_lr"] == 2e-6 and cfg["name"] == "1e3x"
    assert load_config(["--config", "tiny", "optim.mixed_precision=bf16"])["optim"]["mixed_precision"] == "bf16"
    with pytest.raises(ValueError, match="^optim.mixed_precision='yes': expected one of no, fp16, bf16, fp8$"):
        load_config(["--config", "tiny", "optim.mixed_precision=yes"])  # the text typed, not true


def test_one_step_updates_teacher_center_and_masks():
    cfg = load_config(["--config", "tiny"])
    torch.manual_seed(0)
    student, teacher = build_network(cfg), build_network(cfg, teacher=True)
    teacher.load_state_dict(student.state_dict())
    loss_fn = DoRALoss(64, 2)
    glob = torch.randn(2, 2, 3, 32, 32)
    locals_ = [torch.randn(2, 2, 3, 16, 16) for _ in range(2)]
    heads = [0, 3]
    loss, masked = dora_step(student, teacher, loss_fn, glob, locals_, 0, heads, cfg, _null)
    assert torch.isfinite(loss)
    assert masked.shape == (2, 2, 2, 3, 32, 32)
    mask = (masked != 0).float()
    assert 0 < mask.mean() < 1
    assert loss_fn.center.abs().sum() > 0
    before = [p.clone() for p in teacher.parameters()]
    loss.backward()
    opt = torch.optim.AdamW(param_groups(student), lr=1e-3)
    opt.step()
    ema_update(student, teacher, 0.9)
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


DINO_ARGS = (
    "method=dino",
    "augment.num_global_crops=2",
    "augment.global_blur_p=[1.0, 0.1]",
    "augment.global_solarize_p=[0.0, 0.2]",
    "augment.local_flip_p=0.5",
    "augment.precrop_size=null",
    "data.num_frames=1",
)


def test_dino_step_scores_every_view_against_the_two_globals():
    """dino_step = DINOLoss on (student: 2 globals then the locals; teacher: the 2 globals), frames as images."""
    cfg = load_config(["--config", "tiny", *DINO_ARGS])
    torch.manual_seed(0)
    student, teacher = build_network(cfg), build_network(cfg, teacher=True)
    teacher.load_state_dict(student.state_dict())
    student.eval()  # no drop-path: the expected value below recomputes the student
    glob = torch.randn(2, 2, 3, 3, 32, 32)  # (B, G, T, 3, S, S)
    locals_ = [torch.randn(2, 3, 3, 16, 16) for _ in range(2)]
    loss = dino_step(student, teacher, DINOLoss(64, 2), glob, locals_, 0, _null)
    views = [glob[:, 0], glob[:, 1], *locals_]
    s_out = torch.stack([student(v).reshape(6, -1) for v in views])
    t_out = torch.stack([teacher(v).reshape(6, -1) for v in views[:2]])
    assert loss.item() == pytest.approx(DINOLoss(64, 2)(s_out, t_out, 0).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_dino_baseline_trains_and_resumes(tmp_path, video):
    straight = train.main(tiny_args(tmp_path / "straight", video, *DINO_ARGS))
    assert straight["steps"] > 2
    train.main(tiny_args(tmp_path / "split", video, *DINO_ARGS, "optim.max_steps=2"))
    train.main(tiny_args(tmp_path / "split", video, *DINO_ARGS, "resume=latest"))
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    state = json.loads((Path(straight["checkpoint"]) / "state.json").read_text())
    assert state["config"]["method"] == "dino"
    loss_state = load_file(str(Path(straight["checkpoint"]) / "loss.safetensors"))
    assert loss_state["center"].abs().sum() > 0
    with pytest.raises(ValueError, match="num_global_crops=2 with method=dora"):
        train.main(tiny_args(tmp_path / "bad", video, *DINO_ARGS[1:]))
    with pytest.raises(ValueError, match="is a method=dino run; this config has method=dora"):
        train.main(tiny_args(tmp_path / "split", video, "resume=latest", "optim.max_steps=6"))


def test_configs_without_method_train_dora(tmp_path, video):
    """A config written before ``method`` existed (no key) still trains DoRA: the key comes from the default config."""
    from dora.config import config_path

    old = tmp_path / "old.yaml"
    old.write_text("".join(line for line in config_path("tiny").open() if not line.startswith("method:")))
    assert load_config(["--config", str(old)])["method"] == "dora"
    out = train.main(
        ["--config", str(old), f"run_dir={tmp_path / 'run'}", f"data.videos=[{video}]", "optim.max_steps=1"]
    )
    assert out["steps"] == 1


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_gradient_rules():
    lin = torch.nn.Linear(3, 2)
    lin.weight.grad = torch.full((2, 3), 6.0 / 6**0.5)  # norm 6
    lin.bias.grad = torch.tensor([0.6, 0.8])  # norm 1
    norms = clip_gradients(lin, 3.0)
    assert norms.tolist() == pytest.approx([6.0, 1.0], rel=1e-6)
    assert lin.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(lin.bias.grad, torch.tensor([0.6, 0.8]))
    # a whole network against the reference's per-parameter loop (norm, coefficient, scale only when below 1)
    net = build_network(load_config(["--config", "tiny"]))
    torch.manual_seed(0)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * float(torch.rand(()) * 2)
    want, clipped = [], []
    for p in net.parameters():
        g = p.grad.clone()
        coef = 3.0 / (g.norm(2) + 1e-6)
        want.append(g * coef if coef < 1 else g)
        clipped.append(bool(coef < 1))
    assert any(clipped) and not all(clipped)
    clip_gradients(net, 3.0)
    for w, p in zip(want, net.parameters()):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=0)
    # a NaN entry gives a NaN norm: the reference's `coef < 1` is False and leaves the gradient as is
    lin.weight.grad = torch.tensor([[float("nan"), 6.0, 0.0], [1.0, 2.0, 3.0]])
    lin.bias.grad = torch.tensor([30.0, 40.0])
    norms = clip_gradients(lin, 3.0)
    assert torch.isnan(norms[0]) and norms[1].item() == pytest.approx(50.0)
    torch.testing.assert_close(
        lin.weight.grad, torch.tensor([[float("nan"), 6.0, 0.0], [1.0, 2.0, 3.0]]), equal_nan=True
    )
    torch.testing.assert_close(lin.bias.grad, torch.tensor([1.8, 2.4]))

    cfg = load_config(["--config", "tiny"])
    net = build_network(cfg)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(net, epoch=1, freeze_last_layer=1)
    assert net.head.last_layer.weight_v.grad is not None
    cancel_last_layer_gradients(net, epoch=0, freeze_last_layer=1)
    assert net.head.last_layer.weight_v.grad is None and net.head.last_layer.weight_g.grad is None
    assert net.head.mlp[0].weight.grad is not None


def test_weight_decay_groups_follow_dino():
    """DINO's get_params_groups: no decay for ``.bias`` and 1-D parameters; weight_g (out_dim, 1) is decayed."""
    cfg = load_config(["--config", "tiny"])
    net = build_network(cfg)
    decay, no_decay = param_groups(net)
    name = {id(p): n for n, p in net.named_parameters()}
    decayed = {name[id(p)] for p in decay["params"]}
    exempt = {name[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    weights = {"head.last_layer.weight_g", "head.last_layer.weight_v", "head.mlp.0.weight", "backbone.pos_embed"}
    assert weights <= decayed
    assert {"head.mlp.0.bias", "backbone.norm.weight", "backbone.blocks.0.norm1.weight"} <= exempt
    assert decayed | exempt == {n for n, _ in net.named_parameters()} and not decayed & exempt


def test_ema_hand_value():
    s, t = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    s.weight.data.fill_(1.0)
    t.weight.data.fill_(3.0)
    ema_update(s, t, 0.75)
    assert t.weight.item() == pytest.approx(0.75 * 3 + 0.25 * 1)


def test_heads_are_seeded_per_step():
    from dora.tracking import choose_heads

    assert choose_heads(6, 3, random.Random(7)) == choose_heads(6, 3, random.Random(7))


def test_schedules_by_global_step_frozen_last_layer_and_heads_per_step(tmp_path, video, monkeypatch):
    """The optimizer holds lr[it] (linear scaling: lr x global batch / 256) in both groups and wd[it] in the decayed
    group only (0 in the other), it = the global step; the head's last layer keeps its initial weights through epoch 0
    (so the EMA teacher's equals the student's); every step draws its tracking heads from its own RNG."""
    from dora.schedules import cosine_schedule

    states = []
    choose = train.choose_heads
    monkeypatch.setattr(train, "choose_heads", lambda n, k, rng: (states.append(rng.getstate()), choose(n, k, rng))[1])
    run = tmp_path / "run"
    train.main(tiny_args(run, video, "optim.warmup_epochs=0"))  # 2 epochs x 2 steps, batch 2
    lr = cosine_schedule(5e-4 * 2 / 256, 1e-5, 2, 2, 0)
    wd = cosine_schedule(0.04, 0.4, 2, 2)
    assert len(set(lr.tolist())) == 4
    for step in (2, 4):
        groups = json.loads((run / "checkpoints" / f"step_{step:06d}" / "optimizer.json").read_text())["param_groups"]
        assert [g["lr"] for g in groups] == pytest.approx([lr[step - 1]] * 2, rel=1e-6)
        assert [g["weight_decay"] for g in groups] == pytest.approx([wd[step - 1], 0.0], rel=1e-6)
    assert len(states) == 4 and len({repr(s) for s in states}) == 4
    last = {}
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        student, teacher = (load_file(str(ckpt / f"{n}.safetensors")) for n in ("student", "teacher"))
        keys = [k for k in student if "last_layer" in k]
        assert keys
        last[step] = all(torch.allclose(student[k], teacher[k], atol=1e-7, rtol=1e-6) for k in keys)
    assert last == {2: True, 4: False}  # frozen in epoch 0, trained in epoch 1


def test_a_config_file_may_set_some_keys_the_rest_keep_the_defaults(tmp_path):
    """A user's file is laid over the command's default config; a key the default lacks is an error naming it."""
    (tmp_path / "mine.yaml").write_text("optim:\n  lr: 0.001\n")
    cfg, paper = load_config(["--config", str(tmp_path / "mine.yaml")]), load_config([])
    assert cfg["optim"]["lr"] == 0.001 and cfg["optim"]["epochs"] == paper["optim"]["epochs"]
    assert cfg["tracking"] == paper["tracking"] and cfg["method"] == "dora"
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 0.001\n")
    with pytest.raises(KeyError, match=r"^unknown config key 'optim.lrr' \(did you mean optim.lr"):
        load_config(["--config", str(tmp_path / "typo.yaml")])


def test_run_cli_errors_are_one_line_and_a_missing_key_has_no_quotes(tmp_path):
    def raising(err):
        def main():
            raise err

        return main

    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(KeyError("checkpoint c.safetensors lacks head.weight")), "dora-eval")
    assert exit_.value.code == "dora-eval: error: checkpoint c.safetensors lacks head.weight"
    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(FileNotFoundError(f"{tmp_path / 'x.yaml'} does not exist")), "dora-eval")
    assert exit_.value.code == f"dora-eval: error: {tmp_path / 'x.yaml'} does not exist"
    with pytest.raises(ImportError):  # only the errors named: anything else keeps its traceback
        run_cli(raising(ImportError("no module named av")), "dora-eval")
    with pytest.raises(SystemExit, match="^dora-eval: error: no module named av$"):
        run_cli(raising(ImportError("no module named av")), "dora-eval", ImportError)
    worker = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    worker += '  File "w.py", line 1, in f\nValueError: x.jpg is not a readable image\n'
    with pytest.raises(SystemExit) as exit_:  # torch re-raises a worker's error with the worker's traceback
        run_cli(raising(ValueError(worker)), "dora-eval")
    assert exit_.value.code == "dora-eval: error: x.jpg is not a readable image"
    assert run_cli(lambda: 3, "dora-eval") is None


def test_a_bare_leaf_key_is_pointed_to_its_section():
    """difflib alone misses 'run_dir' -> 'train.run_dir' (ratio 0.7): keys with the same last part come first."""
    with pytest.raises(KeyError) as err:
        load_config(["--config", "tiny", "lr=1e-3"])
    assert "(did you mean optim.lr?)" in str(err.value)


def test_overrides_may_add_keys_to_an_empty_mapping_of_the_config_only():
    """An empty mapping (model.overrides, free-form keyword arguments) takes new keys one by one; elsewhere a new key
    is still an error."""
    cfg = load_config(["model.overrides.img_size=96", "model.overrides.patch_size=8"])
    assert cfg["model"]["overrides"] == {"img_size": 96, "patch_size": 8}
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(["model.overridez.img_size=96"])
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(["optim.lr.x=1"])


def test_a_config_that_is_not_a_mapping_and_yaml_flow_without_spaces_are_errors(tmp_path):
    """A list for a config file was an AttributeError; `{embed_dim:48}` is YAML for the key 'embed_dim:48' with no
    value, which timm dropped without a word (the model silently kept its default size)."""
    (tmp_path / "list.yaml").write_text("- optim.lr: 0.1\n")
    with pytest.raises(ValueError, match=r"config .*list.yaml must be a YAML mapping of keys to values, got a list"):
        load_config(["--config", str(tmp_path / "list.yaml")])
    with pytest.raises(ValueError, match=r"'\{embed_dim:48\}': YAML reads 'key:value' without a space as one key"):
        load_config(["--config", "tiny", "model.overrides={embed_dim:48}"])
    assert load_config(["--config", "tiny", "model.overrides={embed_dim: 48}"])["model"]["overrides"] == {
        "embed_dim": 48
    }


def test_bad_counts_output_paths_and_resume_are_errors_that_keep_the_run(tmp_path, video):
    """Zero counts divided by zero, trained without a limit or read no frame; a run or cache folder under a file, a
    resume into another model size and a damaged checkpoint were tracebacks; a failed resume keeps config.yaml."""
    run = tmp_path / "run"
    bad_counts = ("data.batch_size_per_gpu=0", "data.num_frames=0", "data.step=0", "optim.max_steps=0")
    for bad in (*bad_counts, "keep_checkpoints=0", "keep_every_epochs=-1"):  # 0 had kept every checkpoint
        with pytest.raises(ValueError, match=rf"^{bad}: expected a positive integer"):
            train.main(tiny_args(run, video, bad))
    assert not run.exists()
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match=r"^run_dir: .*file is a file; expected a folder"):
        train.main(tiny_args(tmp_path / "file" / "run", video))
    with pytest.raises(ValueError, match=r"^data.cache_dir: .*file is a file; expected a folder"):
        train.main(tiny_args(run, video, f"data.cache_dir={tmp_path / 'file'}"))
    assert (tmp_path / "file").read_text() == "kept"
    train.main(tiny_args(run, video, "optim.max_steps=1"))
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"run already holds the checkpoints of a run: continue it with resume=latest"):
        train.main(tiny_args(run, video, "optim.max_steps=1"))  # a fresh start would replace them
    with pytest.raises(ValueError, match=r"step_000001 was trained with other settings: model.overrides="):
        train.main(tiny_args(run, video, "resume=latest", "model.overrides.embed_dim=64"))
    assert (run / "config.yaml").read_text() == saved
    teacher = run / "checkpoints" / "step_000001" / "teacher.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:100])  # a truncated copy
    with pytest.raises(ValueError, match=r"teacher.safetensors is not a readable safetensors file"):
        train.main(tiny_args(run, video, "resume=latest"))


def test_resume_latest_without_a_checkpoint_and_past_the_end_are_errors(tmp_path, video):
    """resume=latest in a folder without checkpoints started a new run in silence (a misspelt run_dir went
    unnoticed), and a resume past the run's end returned at once: both are errors, as in pin, neco and counting."""
    with pytest.raises(FileNotFoundError, match=r"^resume=latest: no checkpoint under .*new/checkpoints \(leave"):
        train.main(tiny_args(tmp_path / "new", video, "resume=latest"))
    assert not (tmp_path / "new").exists()  # refused before the run folder is made
    with pytest.raises(ValueError, match=r"^resume=True: expected text \(a path or name\), or null$"):
        train.main(tiny_args(tmp_path / "new", video, "resume=true"))  # a TypeError traceback before
    run = tmp_path / "run"
    train.main(tiny_args(run, video, "optim.max_steps=2"))
    with pytest.raises(ValueError, match=r"step_000002 is at step 2, past this run's end at step 1 \(optim.max_steps"):
        train.main(tiny_args(run, video, "optim.max_steps=1", "resume=latest"))


def test_resume_with_other_settings_than_the_checkpoint_is_an_error_listing_them(tmp_path, video):
    """Another seed, crop count or loss variant resumed silently (another data order, objective); the keys are listed,
    and the checkpoint's settings with a longer run resume."""
    run, own = tmp_path / "run", ["seed=1", "augment.num_local_crops=1", "loss.loss_variant=clean"]
    train.main(tiny_args(run, video, "optim.max_steps=1", *own))
    with pytest.raises(ValueError) as err:
        train.main(tiny_args(run, video, "optim.max_steps=2", "resume=latest"))
    assert str(err.value) == (
        f"resume: {run}/checkpoints/step_000001 was trained with other settings: seed=0 (checkpoint: 1); "
        "augment.num_local_crops=2 (checkpoint: 1); loss.loss_variant='reference' (checkpoint: 'clean'); resume it "
        f"with the same overrides (its state.json config, or the run's config.yaml: --config {run}/config.yaml)"
    )
    assert train.main(tiny_args(run, video, "optim.max_steps=2", "resume=latest", *own))["steps"] == 2


def test_cli_prints_a_non_finite_loss_as_one_line(tmp_path, video, monkeypatch):
    monkeypatch.setattr(DoRALoss, "forward", lambda self, *a: torch.tensor(float("nan"), requires_grad=True))
    monkeypatch.setattr(sys, "argv", ["dora-train", *tiny_args(tmp_path / "run", video, "optim.max_steps=1")])
    with pytest.raises(SystemExit) as exc:
        train.cli()
    assert str(exc.value.code).startswith("dora-train: error: non-finite loss [nan] at step 0; last good checkpoint")


def test_resume_from_an_older_checkpoint_logs_each_step_once(tmp_path, video):
    """metrics.jsonl is appended to: a restart at step S first drops the records after S, so the file ends as the
    one of an uninterrupted run."""
    run = tmp_path / "run"
    args = tiny_args(run, video, "checkpoint_every=1", "keep_checkpoints=5")
    train.main(args)
    straight = losses(run)
    train.main([*args, f"resume={run / 'checkpoints' / 'step_000002'}"])
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert losses(run) == pytest.approx(straight, abs=1e-6)


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, video):
    """The checkpoints past a resume's step belong to an abandoned trajectory: they move to checkpoints/abandoned/,
    so that pruning keeps the new run's own and resume=auto continues it."""
    run = tmp_path / "run"
    args = tiny_args(run, video, "checkpoint_every=1", "optim.epochs=3", "keep_every_epochs=null")
    train.main([*args, "optim.max_steps=4", "keep_checkpoints=null"])
    train.main([*args, "optim.max_steps=3", "keep_checkpoints=1", f"resume={run / 'checkpoints' / 'step_000001'}"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["abandoned", "step_000003"]
    assert sorted(p.name for p in (run / "checkpoints" / "abandoned").iterdir()) == [
        "step_000002",
        "step_000003",
        "step_000004",
    ]
    assert "set aside 3 checkpoints past step 1 in" in (run / "log.txt").read_text()
    train.main([*args, "optim.max_steps=6", "resume=auto", "keep_checkpoints=3"])
    assert f"resumed from {run / 'checkpoints' / 'step_000003'} at step 3" in (run / "log.txt").read_text()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "abandoned",
        "step_000004",
        "step_000005",
        "step_000006",
    ]


def test_set_aside_moves_the_later_steps_and_replaces_an_older_copy(tmp_path):
    """Steps past the resume's move to checkpoints/abandoned/ (an older copy there replaced), which is no step."""
    from dora.checkpoint import list_checkpoints, resolve_checkpoint, resolve_resume, set_aside_checkpoints

    for step in (1, 2, 10):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:06d}" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "abandoned" / "step_000002" / "old").mkdir(parents=True)
    moved = set_aside_checkpoints(tmp_path, 1)
    assert [p.name for p in moved] == ["step_000002", "step_000010"]
    assert not (tmp_path / "checkpoints" / "abandoned" / "step_000002" / "old").exists()
    first = tmp_path / "checkpoints" / "step_000001"
    assert list_checkpoints(tmp_path) == [first] and resolve_resume("latest", tmp_path) == first
    assert resolve_checkpoint(tmp_path) == first
    assert set_aside_checkpoints(tmp_path, 1) == []


def test_resume_auto_starts_a_new_run_then_continues_as_latest(tmp_path, video, monkeypatch):
    """resume=auto, for a requeued job that always passes the same command: a new run while the run folder holds no
    checkpoint, else exactly resume=latest (same losses, weights and metrics.jsonl)."""
    straight = tmp_path / "straight"
    train.main(tiny_args(straight, video))
    run = tmp_path / "run"
    real, calls = DoRALoss.forward, []

    def preempted(self, *a):  # the job is stopped during step 4, after step 3 was logged
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(DoRALoss, "forward", preempted)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(run, video, "resume=auto"))  # an empty run folder: a new run from step 0
    monkeypatch.setattr(DoRALoss, "forward", real)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    shutil.copytree(run, tmp_path / "latest")
    auto = train.main(tiny_args(run, video, "resume=auto"))
    latest = train.main(tiny_args(tmp_path / "latest", video, "resume=latest"))
    assert auto["steps"] == latest["steps"] == 4 and auto["loss"] == latest["loss"]
    for name in ("student", "teacher", "loss"):
        a = load_file(str(run / "checkpoints" / "step_000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "latest" / "checkpoints" / "step_000004" / f"{name}.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert losses(run) == losses(tmp_path / "latest") == pytest.approx(losses(straight), abs=1e-6)


def test_latest_checkpoint_is_the_highest_step_by_number(tmp_path):
    """step_1000000 sorts before step_999999 as text: resume, dora-eval of a run folder and pruning go by the number."""
    from dora.checkpoint import list_checkpoints, prune_checkpoints, resolve_checkpoint, resolve_resume

    for step in (999999, 1000000, 2):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:06d}" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_1000001.tmp").mkdir()  # an unfinished checkpoint is none
    order = [tmp_path / "checkpoints" / f"step_{s:06d}" for s in (2, 999999, 1000000)]
    assert list_checkpoints(tmp_path) == order
    assert resolve_resume("latest", tmp_path) == resolve_resume("auto", tmp_path) == order[-1]
    assert resolve_checkpoint(tmp_path) == order[-1]
    prune_checkpoints(tmp_path, 1)
    assert list_checkpoints(tmp_path) == order[-1:]


def test_frame_cache_of_another_video_of_the_same_name_is_an_error(tmp_path, video):
    from dora.synthetic import write_walking_video

    other = write_walking_video(tmp_path / "other" / video.name, num_frames=40, size=48, seed=1)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    out = train.main(tiny_args(tmp_path / "a", video, cache, "optim.max_steps=1"))
    assert out["steps"] == 1
    train.main(tiny_args(tmp_path / "b", video, cache, "optim.max_steps=1"))  # the same video: the cache is reused
    # before: the cache of `video` was used silently for `other` (same file name), i.e. the wrong frames
    with pytest.raises(ValueError, match=r"^data.cache_dir: .* is the frame cache of .*, not of .*other"):
        train.main(tiny_args(tmp_path / "c", f"{video},{other}", cache, "optim.max_steps=1"))


def test_eval_and_visualise_of_a_run_take_the_backbone_it_recorded(tmp_path, video):
    """arch / model_overrides left null come from the checkpoint's config (a tiny run was 30 shape mismatches
    under the default ViT-S/16); given ones still win, and a wrong one is still an error naming the keys."""
    from dora import eval as dora_eval
    from dora import visualise

    train.main(tiny_args(tmp_path / "run", video, "optim.max_steps=1"))
    metrics = dora_eval.main([f"checkpoint={tmp_path / 'run'}", "tasks=[]", f"out_dir={tmp_path / 'eval'}"])
    tiny = load_config(["--config", "tiny"])["model"]
    assert (metrics["arch"], metrics["model_overrides"]) == (tiny["arch"], tiny["overrides"])
    info = visualise.main(
        [
            f"checkpoint={tmp_path / 'run'}",
            f"video={video}",
            "size=32",
            "num_frames=2",
            "step=5",
            f"out_dir={tmp_path / 'vis'}",
        ]
    )
    assert info["checkpoint"].endswith("step_000001")
    with pytest.raises(ValueError, match=r"does not fit the backbone .* set arch / model_overrides"):
        dora_eval.main(
            [
                f"checkpoint={tmp_path / 'run'}",
                "tasks=[]",
                "model_overrides={img_size: 32, patch_size: 8, embed_dim: 48, depth: 2, num_heads: 4}",
            ]
        )


def test_trim_metrics_replaces_the_file_only_once_rewritten(tmp_path, monkeypatch):
    """A kill while the trimmed records are written (here: at the rename) leaves the file as it was (it was rewritten
    in place, so such a kill lost records); a file with nothing past the step is not rewritten."""
    import dora.train as module

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(lines))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        module.trim_metrics(path, 2)
    assert path.read_text() == "".join(lines)
    module.trim_metrics(path, 3)  # nothing to drop: no rename
    monkeypatch.undo()
    module.trim_metrics(path, 2)
    assert path.read_text() == "".join(lines[:2])


def test_resume_of_a_finished_run_reports_no_loss(tmp_path, video):
    """A resume with no step left reports loss None, not nan (which reads as a non-finite loss)."""
    train.main(tiny_args(tmp_path / "run", video, "optim.max_steps=1"))
    done = train.main(tiny_args(tmp_path / "run", video, "optim.max_steps=1", "resume=latest"))
    assert done["steps"] == 1 and done["loss"] is None


def test_resume_on_more_processes_with_the_same_global_batch_is_allowed(tmp_path, video):
    """The data order and learning rate follow the global batch (batch_size_per_gpu x processes): a resume on two GPUs
    with half the per-GPU batch continues the run (it was refused for data.batch_size_per_gpu), another global batch
    is refused."""
    train.main(tiny_args(tmp_path / "run", video, "optim.max_steps=1", "data.batch_size_per_gpu=2"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["global_batch"] == 2
    halved = load_config(["--config", "tiny", "data.batch_size_per_gpu=1"])
    train.check_resume_options(ckpt, state["config"], halved, 1 * 2, state["global_batch"])  # two processes
    with pytest.raises(ValueError, match=r"other settings: global batch 1 = data.batch_size_per_gpu x processes"):
        train.check_resume_options(ckpt, state["config"], halved, 1, state["global_batch"])  # one process
