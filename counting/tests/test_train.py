import json
import math
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from counting.config import load_config, run_cli
from counting.train import batch_indices, learning_rate, main, train_step_inputs


def test_config_overrides_and_unknown_keys():
    cfg, rest = load_config(["--config", "tiny", "optim.lr=0.5", "--train.batch_size", "2", "IMAGE"])
    assert cfg["optim"]["lr"] == 0.5 and cfg["train"]["batch_size"] == 2 and rest == ["IMAGE"]
    with pytest.raises(KeyError, match="valid keys: .*optim.lr") as err:
        load_config(["config=tiny", "optim.lrr=1"])
    assert str(err.value).startswith("unknown config key 'optim.lrr' (did you mean optim.lr")  # printed unquoted
    with pytest.raises(FileNotFoundError, match="not a file, nor a shipped config"):
        load_config(["--config", "nope"])


def test_help_lists_keys(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/counting-eval", "--help"])
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a console script, not `python -m`
    with pytest.raises(SystemExit):
        load_config(["--help"], default="eval")
    out = capsys.readouterr().out
    assert out.startswith("usage: counting-eval [--config") and "protocol = 'original'" in out


def test_paper_defaults():
    cfg, _ = load_config([])
    assert cfg["model"]["backbone"] == "vit_base_patch16_224.dino" and cfg["optim"]["lr"] == 5e-4
    assert cfg["train"]["batch_size"] == 128 and cfg["train"]["samples_per_epoch"] // 128 == 78
    assert cfg["collage"]["density_scaling"] == 3000.0


def test_schedule_warmup_then_cosine():
    cfg = {"optim": {"lr": 1.0, "min_lr": 0.0, "warmup_epochs": 1, "scheduler_epochs": 3}}
    assert learning_rate(0, cfg, 10) == 0.0 and learning_rate(5, cfg, 10) == 0.5
    assert learning_rate(10, cfg, 10) == pytest.approx(1.0) and learning_rate(20, cfg, 10) == pytest.approx(0.5)
    assert learning_rate(30, cfg, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("config", ["uncountr", "uncountr_vitb8", "uncountr_vits16"])
def test_paper_schedule_matches_the_reference_scheduler(config):
    """The reference's CosineSchedulerWithWarmup, written out: built with epochs + 1 = 51 and warmup_percentage 0.1
    (so 5.1 warmup epochs), stepped per iteration at the fractional epoch batch_idx / 78 + epoch."""
    cfg, _ = load_config(["--config", config])
    lr, horizon = 5e-4, 51
    warmup = 0.1 * horizon
    steps_per_epoch = cfg["train"]["samples_per_epoch"] // cfg["train"]["batch_size"]
    for step in range(cfg["train"]["epochs"] * steps_per_epoch):
        epoch = step % steps_per_epoch / steps_per_epoch + step // steps_per_epoch
        if epoch < warmup:
            expected = lr * epoch / warmup
        else:
            expected = lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (horizon - warmup)))
        assert learning_rate(step, cfg, steps_per_epoch) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_train_end_to_end_and_resume_equivalence(tmp_path):
    straight = main(["--config", "tiny", f"output_dir={tmp_path}", "name=a"])
    assert len(straight["losses"]) == 4
    run = tmp_path / "a"
    assert (run / "config.yaml").is_file() and (run / "log.txt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "a"
    first = main(["--config", "tiny", f"output_dir={tmp_path}", "name=b", "train.max_steps=2"])
    second = main(["--config", "tiny", f"output_dir={tmp_path}", "name=b", "resume=latest"])
    assert torch.allclose(torch.tensor(first["losses"] + second["losses"]), torch.tensor(straight["losses"]), atol=1e-6)
    wa = load_file(str(run / "checkpoints/step_000004/model.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/step_000004/model.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("backbone.") for k in wa)  # random backbone is saved
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    """The error names the last good checkpoint (it named the run folder, even when no checkpoint existed); a resume
    past the run's end is an error naming the keys (it returned at once, as after "steps 2..1")."""
    base = ["--config", "tiny", f"output_dir={tmp_path}"]
    with pytest.raises(FloatingPointError, match=r"at step 0; stopping \(last good checkpoint: none\)"):
        main([*base, "collage.density_scaling=1e30", "train.max_steps=1"])
    main([*base, "name=ok", "train.max_steps=2"])
    with pytest.raises(
        FloatingPointError, match=r"step 2; stopping \(last good checkpoint: .*/ok/checkpoints/step_000002"
    ):
        main([*base, "name=ok", "resume=latest", "collage.density_scaling=1e30"])
    with pytest.raises(ValueError, match=r"step_000002 is at step 2, past this run's end at step 1 \(train.max_steps"):
        main([*base, "name=ok", "resume=latest", "train.max_steps=1"])


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["--config", "tiny", f"output_dir={tmp_path}", "resume=latest"])


def test_console_scripts_return_none(monkeypatch):
    """Console scripts wrap ``main`` so that its returned dict is not taken as a failing exit status."""
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("counting-")}
    assert set(scripts) >= {"counting-train", "counting-eval", "counting-demo", "counting-predict"}
    import counting.eval

    monkeypatch.setattr(counting.eval, "main", lambda argv=None: {"val": {}})
    assert scripts["counting-eval"].load()() is None


def test_keep_masks_split_over_processes_and_shared_mask():
    cfg, _ = load_config(["--config", "tiny", "train.batch_size=4"])
    shots, whole = train_step_inputs(5, cfg, 0, 1)
    halves = [train_step_inputs(5, cfg, rank, 2) for rank in (0, 1)]
    assert all(s == shots for s, _ in halves) and 1 <= shots <= cfg["collage"]["max_shots"]
    assert torch.equal(whole[0::2], halves[0][1]) and torch.equal(whole[1::2], halves[1][1])
    assert not torch.equal(whole[0], whole[1])
    cfg["train"]["shared_mask"] = True
    _, shared = train_step_inputs(5, cfg, 0, 1)
    assert all(torch.equal(shared[0], row) for row in shared)
    assert 0.7 < shared.float().mean() < 0.9  # keep_prob 0.8


def test_shots_cover_min_to_max_shots():
    cfg, _ = load_config(["--config", "tiny", "train.batch_size=4"])
    low, high = cfg["train"]["min_shots"], cfg["collage"]["max_shots"]
    assert low < high
    assert {train_step_inputs(step, cfg, 0, 1)[0] for step in range(60)} == set(range(low, high + 1))


def test_every_epoch_draws_new_collages():
    """Epoch e holds dataset indices e * samples_per_epoch .. + samples_per_epoch - 1 (new collages each epoch),
    each exactly once, split over the processes by rank."""
    cfg, _ = load_config(["--config", "tiny", "train.batch_size=4", "train.samples_per_epoch=12"])
    steps = 3
    for epoch in range(2):
        seen = [i for s in range(epoch * steps, (epoch + 1) * steps) for i in batch_indices(s, cfg, steps, 0, 1)]
        assert sorted(seen) == list(range(12 * epoch, 12 * epoch + 12))
    step = batch_indices(4, cfg, steps, 0, 1)
    assert batch_indices(4, cfg, steps, 0, 2) + batch_indices(4, cfg, steps, 1, 2) == step[0::2] + step[1::2]


def test_train_with_loss_ablations(tmp_path):
    # same model, data and keep-masks: keeping distractor pixels and weighting them x2 can only add to the loss
    base = ["--config", "tiny", f"output_dir={tmp_path}", "train.max_steps=1"]
    plain = main([*base, "name=plain"])["losses"][0]
    ablated = main([*base, "name=ablated", "train.keep_all_object_pixels=true", "train.distractor_weight=2.0"])
    assert ablated["losses"][0] > plain
    shared = main([*base, "name=shared", "train.shared_mask=true"])["losses"][0]
    assert shared != plain and torch.isfinite(torch.tensor(shared))


def test_resume_with_other_settings_names_them(tmp_path):
    base = ["--config", "tiny", f"output_dir={tmp_path}", "name=r"]
    main([*base, "train.max_steps=1"])
    main([*base, "resume=latest", "train.max_steps=2", "train.epochs=3"])  # the step budget may change freely
    log = tmp_path / "r" / "log.txt"
    assert "other settings" not in log.read_text()
    main([*base, "resume=latest", "train.max_steps=3", "train.distractor_weight=2.0"])
    assert "other settings than it was trained with: ['train.distractor_weight']" in log.read_text()


def test_a_config_file_may_set_some_keys_the_rest_keep_the_defaults(tmp_path):
    """A user's file is laid over the command's default config; a key the default lacks is an error naming it."""
    (tmp_path / "mine.yaml").write_text("optim:\n  lr: 0.001\n")
    cfg, _ = load_config(["--config", str(tmp_path / "mine.yaml")])
    paper, _ = load_config([])
    assert cfg["optim"]["lr"] == 0.001 and cfg["optim"]["warmup_epochs"] == paper["optim"]["warmup_epochs"]
    assert cfg["model"] == paper["model"] and cfg["collage"] == paper["collage"]
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 0.001\n")
    with pytest.raises(KeyError, match=r"^unknown config key 'optim.lrr' \(did you mean optim.lr"):
        load_config(["--config", str(tmp_path / "typo.yaml")])


def test_run_cli_errors_are_one_line_and_a_missing_key_has_no_quotes(tmp_path):
    def raising(err):
        def main():
            raise err

        return main

    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(KeyError("checkpoint c.safetensors lacks head.weight")), "counting-eval")
    assert exit_.value.code == "counting-eval: error: checkpoint c.safetensors lacks head.weight"
    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(FileNotFoundError(f"{tmp_path / 'x.yaml'} does not exist")), "counting-eval")
    assert exit_.value.code == f"counting-eval: error: {tmp_path / 'x.yaml'} does not exist"
    with pytest.raises(ImportError):  # only the errors named: anything else keeps its traceback
        run_cli(raising(ImportError("no module named av")), "counting-eval")
    with pytest.raises(SystemExit, match="^counting-eval: error: no module named av$"):
        run_cli(raising(ImportError("no module named av")), "counting-eval", ImportError)
    worker = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    worker += '  File "w.py", line 1, in f\nValueError: x.jpg is not a readable image\n'
    with pytest.raises(SystemExit) as exit_:  # torch re-raises a worker's error with the worker's traceback
        run_cli(raising(ValueError(worker)), "counting-eval")
    assert exit_.value.code == "counting-eval: error: x.jpg is not a readable image"
    assert run_cli(lambda: 3, "counting-eval") is None


def test_a_bare_leaf_key_is_pointed_to_its_section():
    """difflib alone misses 'run_dir' -> 'train.run_dir' (ratio 0.7): keys with the same last part come first."""
    with pytest.raises(KeyError) as err:
        load_config(["--config", "tiny", "epochs=1"])
    assert "(did you mean train.epochs?)" in str(err.value)


def test_overrides_may_add_keys_to_an_empty_mapping_of_the_config_only():
    """An empty mapping (model.backbone_kwargs, free-form keyword arguments) takes new keys one by one; elsewhere a
    new key is still an error."""
    cfg = load_config(["model.backbone_kwargs.img_size=96", "model.backbone_kwargs.drop_path_rate=0.2"])[0]
    assert cfg["model"]["backbone_kwargs"] == {"img_size": 96, "drop_path_rate": 0.2}
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(["model.backbone_kwargz.img_size=96"])[0]
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(["optim.lr.x=1"])[0]


def test_bad_counts_output_dir_and_resume_are_errors_that_keep_the_run(tmp_path):
    """Zero or negative counts trained on nothing (or divided by zero), an output folder that is a file, a resume
    into another model size and a damaged checkpoint file were tracebacks; a failed resume no longer rewrites the
    run's config.yaml."""
    base = ["--config", "tiny", f"output_dir={tmp_path}", "name=r"]
    for bad in ("train.batch_size=0", "train.epochs=0", "train.max_steps=0", "train.batch_size=-4"):
        with pytest.raises(ValueError, match=rf"^{bad}: expected a positive integer"):
            main([*base, bad])
    assert not (tmp_path / "r").exists()
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match=r"^output_dir/name: .*file is a file; expected a folder"):
        main(["--config", "tiny", f"output_dir={tmp_path / 'file'}"])
    assert (tmp_path / "file").read_text() == "kept"
    main([*base, "train.max_steps=1"])
    saved = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"r already holds the checkpoints of a run: continue it with resume=latest"):
        main([*base, "train.max_steps=1"])  # a fresh start would replace them
    with pytest.raises(ValueError, match=r"step_000001/model.safetensors does not fit the model of the config"):
        main([*base, "resume=latest", "train.max_steps=2", "model.fim_dim=64"])
    assert (tmp_path / "r" / "config.yaml").read_text() == saved
    optimizer = tmp_path / "r" / "checkpoints" / "step_000001" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a truncated copy
    with pytest.raises(ValueError, match=r"optimizer.safetensors is not a readable safetensors file"):
        main([*base, "resume=latest", "train.max_steps=2"])


def test_non_finite_loss_is_a_one_line_error_of_the_command(tmp_path, monkeypatch):
    from counting.train import cli

    args = ["--config", "tiny", f"output_dir={tmp_path}", "collage.density_scaling=1e30", "train.max_steps=1"]
    monkeypatch.setattr(sys, "argv", ["counting-train", *args])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert str(exit_.value.code).startswith("counting-train: error: non-finite loss")


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_holds_one_record_per_logged_step_and_a_resume_rewrites_the_rest(tmp_path):
    base = ["--config", "tiny", f"output_dir={tmp_path}"]
    straight = main([*base, "name=a"])
    rows = records(tmp_path / "a")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows] == straight["losses"]
    assert set(rows[0]) == {"step", "loss", "train_batch_mae", "lr", "shots"} and rows[0]["lr"] == 0.0  # warmup
    main([*base, "name=b", "train.log_every=3"])
    assert [r["step"] for r in records(tmp_path / "b")] == [3, 4]  # and the last step
    # resumed from an older checkpoint while newer ones exist: the records past it are written again, once
    run = tmp_path / "c"
    main([*base, "name=c", "train.checkpoint_every=1"])
    main([*base, "name=c", f"resume={run / 'checkpoints' / 'step_000002'}"])
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    assert [r["loss"] for r in records(run)] == pytest.approx(straight["losses"], abs=1e-6)


def test_resume_auto_starts_a_new_run_or_continues_the_latest(tmp_path):
    """resume=auto (requeued jobs repeat one command): a fresh start in a folder without checkpoints, else exactly
    resume=latest."""
    base = ["--config", "tiny", f"output_dir={tmp_path}"]
    straight = main([*base, "name=a"])
    assert main([*base, "name=fresh", "resume=auto"])["losses"] == straight["losses"]
    resumed = {}
    for resume in ("latest", "auto"):
        main([*base, f"name={resume}", "train.max_steps=2"])
        resumed[resume] = main([*base, f"name={resume}", f"resume={resume}"])
        assert resumed[resume]["losses"] == pytest.approx(straight["losses"][2:], abs=1e-6)
    assert resumed["auto"]["losses"] == resumed["latest"]["losses"]
    wa, wb = (load_file(str(tmp_path / n / "checkpoints" / "step_000004" / "model.safetensors")) for n in resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_keep_checkpoints_prunes_all_but_the_newest_steps(tmp_path):
    from counting.checkpoint import prune_checkpoints

    def steps(name):
        return sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir())

    base = ["--config", "tiny", f"output_dir={tmp_path}", "train.epochs=3", "train.checkpoint_every=1"]
    main([*base, "name=r", "train.max_steps=5", "train.keep_checkpoints=2"])
    assert steps("r") == ["step_000004", "step_000005"]
    assert main([*base, "name=r", "train.keep_checkpoints=2", "resume=latest"])["step"] == 6
    assert steps("r") == ["step_000005", "step_000006"]
    main([*base, "name=all", "train.max_steps=5", "train.keep_checkpoints=null"])
    assert steps("all") == [f"step_00000{i}" for i in range(1, 6)]
    prune_checkpoints(tmp_path / "all", 2)
    assert steps("all") == ["step_000004", "step_000005"]
    with pytest.raises(ValueError, match=r"^train.keep_checkpoints=0: expected a positive integer, or null"):
        main([*base, "name=bad", "train.keep_checkpoints=0"])


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    """The checkpoints past a resume's step belong to an abandoned trajectory: they move to checkpoints/abandoned/,
    so that pruning keeps the new run's own and resume=auto continues it."""
    run = tmp_path / "c"
    base = ["--config", "tiny", f"output_dir={tmp_path}", "name=c", "train.checkpoint_every=1", "train.epochs=4"]
    main([*base, "train.max_steps=4", "train.keep_checkpoints=null"])
    main([*base, "train.max_steps=3", "train.keep_checkpoints=1", f"resume={run / 'checkpoints' / 'step_000001'}"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["abandoned", "step_000003"]
    assert sorted(p.name for p in (run / "checkpoints" / "abandoned").iterdir()) == [
        "step_000002",
        "step_000003",
        "step_000004",
    ]
    assert "set aside 3 checkpoints past step 1 in" in (run / "log.txt").read_text()
    assert len(main([*base, "train.max_steps=6", "resume=auto"])["losses"]) == 3  # from step 3, not the stale 4
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "abandoned",
        "step_000004",
        "step_000005",
        "step_000006",
    ]


def test_trim_records_drops_later_steps_and_a_line_cut_short_by_a_crash(tmp_path):
    from counting.train import trim_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    trim_records(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_trim_records_replaces_the_file_only_once_rewritten(tmp_path, monkeypatch):
    """A kill while the trimmed records are written (here: at the rename) leaves the file as it was (it was rewritten
    in place, so such a kill lost records); a file with nothing past the step is not rewritten."""
    import counting.train as module

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
    main(["--config", "tiny", f"output_dir={tmp_path}", "name=r", "train.max_steps=1", "train.mixed_precision=bf16"])
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "train.mixed_precision=bf16 needs a GPU: this CPU run trains in float32" in log
