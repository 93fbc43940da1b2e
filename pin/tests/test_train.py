import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from pin import train as train_mod
from pin.config import load_config, run_cli
from pin.train import lr_at_epoch


def test_resume_continues_the_same_trajectory(tmp_path):
    base = ["--config", "tiny", f"out_dir={tmp_path}"]
    straight = train_mod.main(base + ["name=a"])  # 2 epochs x 2 steps, phase switch after epoch 1
    assert straight["step"] == 4 and len(straight["losses"]) == 4
    first = train_mod.main(base + ["name=b", "train.max_steps=2"])
    assert first["step"] == 2
    resumed = train_mod.main(base + ["name=b", "--resume", "latest"])
    assert resumed["step"] == 4
    assert straight["losses"][:2] == pytest.approx(first["losses"], abs=1e-6)
    assert straight["losses"][2:] == pytest.approx(resumed["losses"], abs=1e-6)
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "step_0000004" / "weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "step_0000004" / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6)
    # only the PIN tensors are stored: the MLP and the fixed table
    assert set(wa) == {"pos_enc"} | {k for k in wa if k.startswith("mlp.")}
    assert wa["pos_enc"].shape == (1, 65, 64)
    assert (tmp_path / "a" / "config.yaml").is_file() and (tmp_path / "a" / "log.txt").is_file()


def test_resume_from_the_newest_of_several_checkpoints_in_the_middle_of_an_epoch(tmp_path):
    """Step checkpoints 1, 2, 3 (2 steps per epoch): `latest` is step 3, and the resumed run skips the epoch's
    first batch instead of training on it again."""
    base = ["--config", "tiny", f"out_dir={tmp_path}"]
    straight = train_mod.main(base + ["name=a"])
    first = train_mod.main(base + ["name=b", "train.max_steps=3", "train.checkpoint_every_steps=1"])
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step_*")) == [
        f"step_000000{i}" for i in (1, 2, 3)
    ]
    resumed = train_mod.main(base + ["name=b", "--resume", "latest"])
    assert first["step"] == 3 and resumed["step"] == 4 and len(resumed["losses"]) == 1
    assert straight["losses"][:3] == pytest.approx(first["losses"], abs=1e-6)
    assert straight["losses"][3:] == pytest.approx(resumed["losses"], abs=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = train_mod.training_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "training_loss", flaky)
    with pytest.raises(FloatingPointError, match=r"nan at step 2; last good checkpoint: .*step_0000002$"):
        train_mod.main(["--config", "tiny", f"out_dir={tmp_path}"])
    assert (tmp_path / "tiny" / "checkpoints" / "step_0000002" / "weights.safetensors").is_file()
    assert not (tmp_path / "tiny" / "checkpoints" / "step_0000003").exists()


def test_config_errors():
    with pytest.raises(KeyError, match="unknown config key 'optim.lrr'.*optim.lr") as err:
        load_config(["--config", "tiny", "optim.lrr=1"])
    assert str(err.value).startswith("unknown config key 'optim.lrr' (did you mean optim.lr?)")  # printed unquoted
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        load_config(["--config", "nope"])
    cfg, _ = load_config(["--config", "tiny", "--optim.lr", "0.5", "train.epochs=3"])
    assert cfg["optim"]["lr"] == 0.5 and cfg["train"]["epochs"] == 3


def test_default_config_is_the_paper_recipe():
    cfg, _ = load_config([])
    assert cfg["model"]["name"] == "Salesforce/blip2-opt-2.7b"
    assert cfg["optim"] == {"lr": 1e-3, "weight_decay": 0.0, "milestones": [200], "gamma": 0.5}
    assert cfg["train"]["epochs"] == 160 and cfg["train"]["batch_size"] == 64
    assert cfg["data"]["train_size"] == 60000 and cfg["data"]["switch_epoch"] == 40
    assert cfg["eval"]["num_beams"] == 3 and cfg["eval"]["max_new_tokens"] == 12
    assert cfg["train"]["val_every_epochs"] == 10  # the reference validates every 10 epochs


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        train_mod.main(["--config", "tiny", f"out_dir={tmp_path}", "--resume", "latest"])


class _ScaledAccelerator(train_mod.Accelerator):
    """CPU stand-in for an fp16 run: accelerate's loss scaling with a torch GradScaler (growth after 3 good steps)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=3)


def test_fp16_resume_restores_the_grad_scaler(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(train_mod, "Accelerator", _ScaledAccelerator)
    base = ["--config", "tiny", f"out_dir={tmp_path}"]
    straight = train_mod.main(base + ["name=a"])
    train_mod.main(base + ["name=b", "train.max_steps=2"])
    resumed = train_mod.main(base + ["name=b", "--resume", "latest"])
    assert straight["losses"][2:] == pytest.approx(resumed["losses"], abs=1e-6)

    def scaler(run, step):
        with open(tmp_path / run / "checkpoints" / f"step_{step:07d}" / "state.json") as f:
            s = json.load(f)["scaler"]
        return s["scale"], s["_growth_tracker"]

    # finite grads every step: tracker 1, 2, then at 3 the scale doubles and the tracker resets, 1 after step 4
    assert scaler("b", 2) == (16.0, 2)
    assert scaler("a", 4) == scaler("b", 4) == (32.0, 1)  # a fresh scaler on resume would end at (16.0, 2)


def test_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    from pin.checkpoint import load_scaler, load_state, save_checkpoint

    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=5)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    for _ in range(2):
        scaler.scale(p.sum()).backward()
        scaler.step(opt)
        scaler.update()
    cfg, _ = load_config(["--config", "tiny"])
    path = save_checkpoint(tmp_path, 2, {"w": p.detach().clone()}, opt, {"step": 2}, cfg, scaler)
    state, _ = load_state(path)
    fresh = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=5)
    load_scaler(fresh, state["scaler"])
    assert (fresh.get_scale(), fresh.state_dict()["_growth_tracker"]) == (8.0, 2)
    load_scaler(None, state["scaler"])  # bf16 / fp32 resume: nothing to restore
    assert save_checkpoint(tmp_path, 3, {"w": p.detach()}, opt, {"step": 3}, cfg).joinpath("state.json").is_file()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_keys_and_exits_0(flag, capsys, monkeypatch):
    from pin import localise

    monkeypatch.setattr(sys, "argv", ["/venv/bin/pin-localise", flag])  # the usage line names the command

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a console script, not `python -m`
    with pytest.raises(SystemExit):
        localise.main([flag])
    assert capsys.readouterr().out.startswith('usage: pin-localise IMAGE "object name" [--config')

    for main in (train_mod.main, localise.main):
        with pytest.raises(SystemExit) as exc:
            main([flag])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "optim.lr = " in out and 'IMAGE "object name"' in out and "checkpoint=..." in out


def test_checkpoint_folder_is_replaced_without_a_window_where_neither_exists(tmp_path):
    from pin.checkpoint import replace_dir

    target, new = tmp_path / "step_0000004", tmp_path / "tmp"
    target.mkdir()
    (target / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    replace_dir(new, target)
    assert (target / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004"]
    # a crash after moving the old folder aside (here: the new folder is gone) leaves it complete, under a name
    # that step_* lookups do not match
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "missing", target)
    assert (tmp_path / ".old_step_0000004" / "w").read_text() == "new"


def test_bad_data_or_resume_path_fails_before_the_vlm_is_built(tmp_path, monkeypatch):
    """pin-train reads its data and finds the checkpoint to resume before it builds (or downloads) the VLM."""

    def no_vlm(_cfg):
        raise AssertionError("the VLM was built before the bad path was noticed")

    monkeypatch.setattr(train_mod, "vlm_from_cfg", no_vlm)
    base = ["--config", "tiny", f"out_dir={tmp_path}"]
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"object pool {missing} not found"):
        train_mod.main(base + [f"data.objects={missing}"])
    with pytest.raises(FileNotFoundError, match=f"background folder {missing} not found"):
        train_mod.main(base + [f"data.backgrounds={missing}"])
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        train_mod.main(base + ["--resume", "latest"])


def test_lr_steps_down_at_each_milestone_epoch():
    cfg = {"optim": {"lr": 1.0, "gamma": 0.1, "milestones": [2, 4]}}
    assert [lr_at_epoch(cfg, e) for e in range(6)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_a_config_file_may_set_some_keys_the_rest_keep_the_defaults(tmp_path):
    """A user's file is laid over the command's default config; a key the default lacks is an error naming it."""
    (tmp_path / "mine.yaml").write_text("optim:\n  lr: 0.001\n")
    cfg, _ = load_config(["--config", str(tmp_path / "mine.yaml")])
    paper, _ = load_config([])
    assert cfg["optim"]["lr"] == 0.001 and cfg["optim"]["milestones"] == paper["optim"]["milestones"]
    assert cfg["model"] == paper["model"] and cfg["pin"] == paper["pin"]
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 0.001\n")
    with pytest.raises(KeyError, match=r"^unknown config key 'optim.lrr' \(did you mean optim.lr"):
        load_config(["--config", str(tmp_path / "typo.yaml")])


def test_run_cli_errors_are_one_line_and_a_missing_key_has_no_quotes(tmp_path):
    def raising(err):
        def main():
            raise err

        return main

    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(KeyError("checkpoint c.safetensors lacks head.weight")), "pin-eval")
    assert exit_.value.code == "pin-eval: error: checkpoint c.safetensors lacks head.weight"
    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(FileNotFoundError(f"{tmp_path / 'x.yaml'} does not exist")), "pin-eval")
    assert exit_.value.code == f"pin-eval: error: {tmp_path / 'x.yaml'} does not exist"
    with pytest.raises(ImportError):  # only the errors named: anything else keeps its traceback
        run_cli(raising(ImportError("no module named av")), "pin-eval")
    with pytest.raises(SystemExit, match="^pin-eval: error: no module named av$"):
        run_cli(raising(ImportError("no module named av")), "pin-eval", ImportError)
    worker = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    worker += '  File "w.py", line 1, in f\nValueError: x.jpg is not a readable image\n'
    with pytest.raises(SystemExit) as exit_:  # torch re-raises a worker's error with the worker's traceback
        run_cli(raising(ValueError(worker)), "pin-eval")
    assert exit_.value.code == "pin-eval: error: x.jpg is not a readable image"
    assert run_cli(lambda: 3, "pin-eval") is None


def test_a_bare_leaf_key_is_pointed_to_its_section():
    """difflib alone misses 'run_dir' -> 'train.run_dir' (ratio 0.7): keys with the same last part come first."""
    with pytest.raises(KeyError) as err:
        load_config(["--config", "tiny", "epochs=1"])
    assert "(did you mean train.epochs?)" in str(err.value)


def test_overrides_may_add_keys_to_an_empty_mapping_of_the_config_only():
    """An empty mapping (eval.roots, free-form keyword arguments) takes new keys one by one; elsewhere a new key
    is still an error."""
    cfg = load_config(["--config", "tiny", *["eval.roots.refcoco=/data/refcoco", "eval.roots.pvoc=/data/voc"]])[0]
    assert cfg["eval"]["roots"] == {"refcoco": "/data/refcoco", "pvoc": "/data/voc"}
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(["--config", "tiny", *["eval.rootz.refcoco=/data/refcoco"]])[0]
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(["--config", "tiny", *["optim.lr.x=1"]])[0]


@pytest.mark.parametrize(
    "override", ["train.batch_size=-2", "train.batch_size=0", "train.epochs=0", "train.max_steps=0"]
)
def test_counts_that_are_not_positive_integers_are_errors_naming_the_key(tmp_path, override):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"^{key.replace('.', '[.]')}={value}: expected a positive integer"):
        train_mod.main(["--config", "tiny", f"out_dir={tmp_path}", override])
    assert not (tmp_path / "tiny").exists()  # no step_0000000 checkpoint of an untrained insert


def test_a_run_with_checkpoints_is_not_overwritten_by_a_fresh_start(tmp_path):
    base = ["--config", "tiny", f"out_dir={tmp_path}", "train.val_every_epochs=null", "train.epochs=1"]
    train_mod.main(base)
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_0000002" / "weights.safetensors"
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"tiny already holds the checkpoints of a run: continue it with --resume"):
        train_mod.main(base + ["optim.lr=0.5"])
    assert ckpt.read_bytes() == before


def test_an_output_folder_that_is_a_file_is_an_error_naming_it(tmp_path):
    from pin import demo

    (tmp_path / "file").write_text("not a folder")
    for out_dir, name in ((tmp_path, "file"), (tmp_path / "file", "run")):
        with pytest.raises(ValueError, match=rf"output folder {out_dir / name}: {tmp_path / 'file'} is a file"):
            train_mod.main(["--config", "tiny", f"out_dir={out_dir}", f"name={name}"])
    with pytest.raises(ValueError, match=rf"output folder {tmp_path / 'file'}: .* is a file"):
        demo.main(["--out", str(tmp_path / "file"), "--quick"])  # before minutes of training, not after
    assert (tmp_path / "file").read_text() == "not a folder"


def test_resuming_a_finished_run_writes_nothing_and_past_its_end_is_an_error(tmp_path):
    """A finished run resumed rewrote its last checkpoint, one resumed with fewer steps trained nothing and returned
    at once (neco: an error naming the keys); a non-finite loss names the checkpoint a run resumed from."""
    args = ["--config", "tiny", f"out_dir={tmp_path}"]
    train_mod.main(args)
    last = tmp_path / "tiny" / "checkpoints" / "step_0000004" / "state.json"
    written = last.stat().st_mtime_ns
    assert train_mod.main([*args, "--resume", "latest"])["step"] == 4
    assert last.stat().st_mtime_ns == written
    with pytest.raises(ValueError, match=r"step_0000004 is at step 4, past this run's end at step 2 \(train.max_steps"):
        train_mod.main([*args, "--resume", "latest", "train.max_steps=2"])


def test_non_finite_loss_is_a_one_line_error_of_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "training_loss", lambda *args, **kwargs: torch.tensor(float("nan")))
    monkeypatch.setattr(sys, "argv", ["pin-train", "--config", "tiny", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        train_mod.cli()
    assert str(exit_.value.code).startswith("pin-train: error: non-finite loss nan at step 0")


def steps_of(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_metrics_jsonl_holds_one_record_per_logged_step_and_a_resume_rewrites_the_rest(tmp_path):
    base = ["--config", "tiny", f"out_dir={tmp_path}"]
    straight = train_mod.main(base + ["name=a"])
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and [r["epoch"] for r in records] == [0, 0, 1, 1]
    assert [r["loss"] for r in records] == pytest.approx(straight["losses"]) and records[0]["lr"] == 1e-3
    train_mod.main(base + ["name=b", "train.log_every=2"])
    assert steps_of(tmp_path / "b" / "metrics.jsonl") == [2, 4]
    # resumed from an older checkpoint while newer ones exist: the records past it are written again, once
    run = tmp_path / "c"
    train_mod.main(base + ["name=c", "train.checkpoint_every_steps=1"])
    train_mod.main(base + ["name=c", "--resume", str(run / "checkpoints" / "step_0000002")])
    assert steps_of(run / "metrics.jsonl") == [1, 2, 3, 4] and steps_of(run / "validation.jsonl") == [2, 4]
    resumed = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed == pytest.approx(straight["losses"], abs=1e-6)


def test_a_run_killed_in_the_validation_after_its_checkpoint_validates_that_epoch_on_resume(tmp_path):
    """--resume auto from the checkpoint ending epoch 0, whose validation was cut short by a kill, runs it again."""
    import shutil

    base = ["--config", "tiny", f"out_dir={tmp_path}", "name=a", "train.checkpoint_every_steps=1", "--resume", "auto"]
    train_mod.main(base)
    run = tmp_path / "a"
    straight = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    for name in ("step_0000003", "step_0000004"):
        shutil.rmtree(run / "checkpoints" / name)
    (run / "validation.jsonl").write_text(json.dumps(straight[0])[:30])  # the kill: its line cut short
    train_mod.main(base)
    records = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert [r["val_loss"] for r in records] == pytest.approx([r["val_loss"] for r in straight], abs=1e-6)


def test_a_refused_command_leaves_the_runs_config_yaml(tmp_path):
    base = ["--config", "tiny", f"out_dir={tmp_path}", "train.val_every_epochs=null", "train.epochs=1"]
    train_mod.main(base)
    saved = (tmp_path / "tiny" / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="already holds the checkpoints of a run"):
        train_mod.main(base + ["optim.lr=0.5"])
    with pytest.raises(ValueError, match="past this run's end"):
        train_mod.main(base + ["--resume", "latest", "train.max_steps=1"])
    assert (tmp_path / "tiny" / "config.yaml").read_bytes() == saved
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        train_mod.main(base + ["name=new", "--resume", "latest"])
    assert not (tmp_path / "new" / "config.yaml").exists()


def test_resume_auto_starts_a_new_run_or_continues_the_latest(tmp_path):
    """--resume auto (requeued jobs repeat one command): a fresh start in a folder without checkpoints, else exactly
    --resume latest."""
    base = ["--config", "tiny", f"out_dir={tmp_path}", "train.val_every_epochs=null"]
    straight = train_mod.main(base + ["name=a"])
    assert train_mod.main(base + ["name=fresh", "--resume", "auto"])["losses"] == straight["losses"]
    resumed = {}
    for resume in ("latest", "auto"):
        train_mod.main(base + [f"name={resume}", "train.max_steps=2"])
        resumed[resume] = train_mod.main(base + [f"name={resume}", "--resume", resume])
        assert resumed[resume]["losses"] == pytest.approx(straight["losses"][2:], abs=1e-6)
    assert resumed["auto"]["losses"] == resumed["latest"]["losses"]
    wa, wb = (load_file(str(tmp_path / n / "checkpoints" / "step_0000004" / "weights.safetensors")) for n in resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_keep_checkpoints_prunes_all_but_the_newest_steps(tmp_path):
    from pin.checkpoint import prune_checkpoints

    def steps(name):
        return sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir())

    base = ["--config", "tiny", f"out_dir={tmp_path}", "train.val_every_epochs=null", "train.epochs=3"]
    base += ["train.checkpoint_every_steps=1"]
    train_mod.main(base + ["name=r", "train.max_steps=5", "train.keep_checkpoints=2"])
    assert steps("r") == ["step_0000004", "step_0000005"]
    assert train_mod.main(base + ["name=r", "train.keep_checkpoints=2", "--resume", "latest"])["step"] == 6
    assert steps("r") == ["step_0000005", "step_0000006"]
    train_mod.main(base + ["name=all", "train.max_steps=5", "train.keep_checkpoints=null"])
    assert steps("all") == [f"step_000000{i}" for i in range(1, 6)]
    prune_checkpoints(tmp_path / "all", 2)
    assert steps("all") == ["step_0000004", "step_0000005"]
    with pytest.raises(ValueError, match=r"^train.keep_checkpoints=0: expected a positive integer or null$"):
        train_mod.main(base + ["name=bad", "train.keep_checkpoints=0"])


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    """The checkpoints past a resume's step belong to an abandoned trajectory: they move to checkpoints/abandoned/,
    so that pruning keeps the new run's own and --resume auto continues it."""
    run = tmp_path / "c"
    base = ["--config", "tiny", f"out_dir={tmp_path}", "name=c", "train.val_every_epochs=null", "train.epochs=3"]
    base += ["train.checkpoint_every_steps=1"]
    train_mod.main(base + ["train.max_steps=4", "train.keep_checkpoints=null"])
    resume = str(run / "checkpoints" / "step_0000001")
    train_mod.main(base + ["train.max_steps=3", "train.keep_checkpoints=1", "--resume", resume])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["abandoned", "step_0000003"]
    assert sorted(p.name for p in (run / "checkpoints" / "abandoned").iterdir()) == [
        "step_0000002",
        "step_0000003",
        "step_0000004",
    ]
    assert "set aside 3 checkpoints past step 1 in" in (run / "log.txt").read_text()
    assert len(train_mod.main(base + ["train.max_steps=6", "--resume", "auto"])["losses"]) == 3  # not from step 4
    assert steps_of(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "abandoned",
        "step_0000004",
        "step_0000005",
        "step_0000006",
    ]


def test_trim_records_drops_later_steps_and_a_line_cut_short_by_a_crash(tmp_path):
    from pin.runlog import trim_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    trim_records(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_trim_records_replaces_the_file_only_once_rewritten(tmp_path, monkeypatch):
    """A kill while the trimmed records are written (here: at the rename) leaves the file as it was (it was rewritten
    in place, so such a kill lost records); a file with nothing past the step is not rewritten."""
    import pin.runlog as module

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(lines))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        module.trim_records(path, 2)
    assert path.read_text() == "".join(lines)
    module.trim_records(path, 3)  # nothing to drop: no rename
    monkeypatch.undo()
    module.trim_records(path, 2)
    assert path.read_text() == "".join(lines[:2])


def test_mixed_precision_on_cpu_is_said_to_train_in_float32(tmp_path, monkeypatch):
    """Without CUDA, train.mixed_precision is dropped: the log says so instead of nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train_mod.main(["--config", "tiny", f"out_dir={tmp_path}", "train.max_steps=1", "train.mixed_precision=fp16"])
    log = (tmp_path / "tiny" / "log.txt").read_text()
    assert "train.mixed_precision=fp16 needs a GPU: this CPU run trains in float32" in log
