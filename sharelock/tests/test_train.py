import json
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sharelock import train
from sharelock.config import load_config, run_cli
from sharelock.pairs import StorePairs, split_train_val
from sharelock.store import FeatureWriter


def write_store(path, ids, feats, modality, model):
    with FeatureWriter(path, model, modality, feats.shape[1], shard_size=64) as w:
        w.add(ids, feats)


@pytest.fixture()
def stores(tmp_path):
    """120 pairs with a learnable relation: captions are a fixed random linear map of the image features (+ noise)."""
    rng = np.random.default_rng(0)
    ids = [f"{i:05d}" for i in range(120)]
    v = rng.normal(size=(120, 8)).astype(np.float32)
    proj = rng.normal(size=(8, 12)).astype(np.float32)
    write_store(tmp_path / "v", ids, v, "image", "vit")
    order = rng.permutation(120)  # caption stores written in another order than the vision store
    for k in range(2):
        t = v @ proj + 0.1 * rng.normal(size=(120, 12)).astype(np.float32)
        write_store(tmp_path / f"t{k}", [ids[i] for i in order], t[order], "text", "llm")
    return tmp_path


def tiny_args(stores, run, *extra):
    datasets = json.dumps([{"vision": str(stores / "v"), "text": [str(stores / "t0"), str(stores / "t1")]}])
    return [
        f"run_dir={run}", f"data.datasets={datasets}", "data.val_size=24", "model.hidden_dim=16",
        "optim.batch_size=16", "optim.accumulate_grad_batches=2", "optim.max_steps=8", "optim.warmup_steps=2",
        "val_check_interval=3", "checkpoint_every=4", "log_every=1", *extra,
    ]  # fmt: skip


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def nan_datasets(tmp_path):
    """A store whose every third image feature is NaN: the first training loss is non-finite."""
    rng = np.random.default_rng(1)
    v = rng.normal(size=(60, 8)).astype(np.float32)
    v[::3] = np.nan
    write_store(tmp_path / "nan" / "v", [str(i) for i in range(60)], v, "image", "vit")
    t = rng.normal(size=(60, 12)).astype(np.float32)
    write_store(tmp_path / "nan" / "t", [str(i) for i in range(60)], t, "text", "llm")
    return json.dumps([{"vision": str(tmp_path / "nan" / "v"), "text": str(tmp_path / "nan" / "t")}])


def test_resume_continues_the_same_trajectory(stores, tmp_path):
    straight = tmp_path / "a"
    summary = train.main(tiny_args(stores, straight))
    assert summary["step"] == 8
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_000004", resumed / "checkpoints" / "step_000004")
    train.main(tiny_args(stores, resumed, "resume=latest"))
    np.testing.assert_allclose(losses(resumed), losses(straight)[4:], rtol=1e-6, atol=1e-6)
    # resuming a finished run trains no step: its summary.json stays strict JSON (no NaN loss)
    assert train.main(tiny_args(stores, resumed, "resume=latest"))["train_loss"] is None

    def no_constants(name):
        raise ValueError(f"{name} in summary.json")

    assert json.loads((resumed / "summary.json").read_text(), parse_constant=no_constants)["step"] == 8
    a = load_file(str(straight / "checkpoints" / "step_000008" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_000008" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)
    state = json.loads((resumed / "checkpoints" / "step_000008" / "trainer_state.json").read_text())
    assert state["loop"]["step"] == 8 and state["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    # the resolved config travels with the run and every checkpoint
    assert "optim" in (straight / "config.yaml").read_text()
    assert (straight / "checkpoints" / "step_000008" / "config.yaml").is_file()
    assert (straight / "checkpoints" / "best" / "model.safetensors").is_file()


def test_training_reduces_validation_loss(stores, tmp_path):
    summary = train.main(tiny_args(stores, tmp_path / "r", "optim.max_steps=30", "val_check_interval=10"))
    history = json.loads((tmp_path / "r" / "checkpoints" / "step_000030" / "trainer_state.json").read_text())["loop"]
    vals = [h["val_loss"] for h in history["history"]]
    assert len(vals) == 6 and vals[-1] < vals[0] - 0.3
    assert summary["best_val_loss"] == pytest.approx(min(vals))


def test_early_stopping_and_nonfinite_loss(stores, tmp_path):
    # min_delta 100: the first validation improves on +inf, the second cannot -> stop with patience 1
    args = tiny_args(stores, tmp_path / "es", "early_stopping.patience=1", "early_stopping.min_delta=100")
    summary = train.main(args + ["val_check_interval=4", "optim.accumulate_grad_batches=1", "optim.max_steps=20"])
    # validations after micro-batches 4 and 8; the stop comes after the 8th optimizer step, which is checkpointed
    assert summary["step"] == 8
    assert (tmp_path / "es" / "checkpoints" / "step_000008" / "trainer_state.json").is_file()
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 0; last good checkpoint: none$"):
        train.main(tiny_args(stores, tmp_path / "nan_run", f"data.datasets={nan_datasets(tmp_path)}"))


def test_pairs_random_caption_choice_and_id_alignment(stores):
    pairs = StorePairs([{"vision": str(stores / "v"), "text": [str(stores / "t0"), str(stores / "t1")]}])
    from sharelock.store import FeatureStore

    vision, t0, t1 = (FeatureStore(stores / n) for n in ("v", "t0", "t1"))
    ids = sorted(vision.ids)
    idx = np.arange(120)
    v, t = pairs.batch(idx, np.random.default_rng(0))
    torch.testing.assert_close(v, vision.get(ids))
    from_0 = (t == t0.get(ids)).all(1)
    from_1 = (t == t1.get(ids)).all(1)
    assert bool((from_0 | from_1).all())
    assert 40 < int(from_0.sum()) < 80  # about half from each caption file


def test_split_missing_ids_and_config_errors(stores, tmp_path):
    train_idx, val_idx = split_train_val(10, 3, seed=42)
    order = list(range(10))
    random.Random(42).shuffle(order)
    assert val_idx.tolist() == order[:3] and train_idx.tolist() == order[3:]
    assert len(split_train_val(100, 0.1)[1]) == 10
    with pytest.raises(ValueError, match="must be smaller than the number of samples"):
        split_train_val(5, 5)
    write_store(tmp_path / "short", ["00000", "00001"], np.zeros((2, 12), np.float32), "text", "llm")
    with pytest.raises(KeyError, match=r"short .*lacks 118 of 120 requested ids \(required by vision store"):
        StorePairs([{"vision": str(stores / "v"), "text": [str(tmp_path / "short")]}])
    with pytest.raises(KeyError, match="unknown config key 'optim.lrr'.*; valid keys: .*optim.lr") as err:
        load_config(["optim.lrr=1"], "default")
    assert str(err.value).startswith("unknown config key 'optim.lrr' (did you mean optim.lr?)")  # printed unquoted
    user = tmp_path / "user.yaml"  # a user config file: the nested key is named in full, as on the command line
    user.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(KeyError, match=r"^unknown config key 'optim.lrr' \(did you mean optim.lr\?\); valid keys: "):
        load_config(["--config", str(user)], "default")
    cfg = load_config(["optim.lr=1e-3", "--optim.weight_decay", "-2.5E-4"], "default")  # YAML 1.1: strings
    assert cfg["optim"]["lr"] == 0.001 and cfg["optim"]["weight_decay"] == -0.00025
    write_store(tmp_path / "v2", [f"{i:05d}" for i in range(120)], np.zeros((120, 8), np.float32), "image", "vit2")
    with pytest.raises(ValueError, match="come from different vision models"):
        StorePairs([{"vision": str(stores / "v"), "text": str(stores / "t0")},
                    {"vision": str(tmp_path / "v2"), "text": str(stores / "t0")}])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no feature store at"):
        train.main(tiny_args(stores, tmp_path / "x", "data.datasets=[{vision: /nonexistent, text: /nonexistent}]"))


def test_malformed_dataset_entries_are_errors_naming_the_entry(stores):
    with pytest.raises(
        ValueError, match=r"data\.datasets\[0\] lacks 'vision' \(expected vision, text; got \['text', 'vison'\]"
    ):
        StorePairs([{"vison": str(stores / "v"), "text": [str(stores / "t0")]}])
    with pytest.raises(ValueError, match=r"data\.datasets\[1\] lacks 'text'"):
        StorePairs([{"vision": str(stores / "v"), "text": str(stores / "t0")}, {"vision": str(stores / "v")}])
    with pytest.raises(
        ValueError, match=r"data\.datasets must be a list of \{vision: STORE, text: \[STORES\]\}, got '/x'"
    ):
        StorePairs("/x")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_keys_and_exits_0(flag, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/sharelock-train", flag])  # the usage line names the command
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a console script, not `python -m`
    with pytest.raises(SystemExit) as exc:
        train.main([flag])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sharelock-train [--config") and "optim.lr = " in out and "tiny" in out


def test_config_by_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: names fall back to the packaged configs
    for given in ("cc3m", "cc3m.yaml", "configs/cc3m.yaml"):
        assert load_config(["--config", given], "default")["name"] == "sharelock-cc3m"
    with pytest.raises(FileNotFoundError, match=r"no file .*nope, nor a packaged config \(cc12m, cc3m, .*tiny"):
        load_config(["--config", "nope"], "default")  # the names to choose from
    with pytest.raises(FileNotFoundError, match="config file not found: .*elsewhere/configs/cc3m.yaml"):
        load_config(["--config", str(tmp_path / "elsewhere" / "configs" / "cc3m.yaml")], "default")


def test_checkpoint_folder_is_replaced_without_a_window_where_neither_exists(tmp_path):
    from sharelock.training import replace_dir

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


def test_validation_split_is_taken_per_dataset(stores, tmp_path):
    """Reference: each dataset of the list gets its own split (the first val_size of its shuffled ids), and the
    train and val parts are concatenated; so val_size counts per dataset."""
    from sharelock.losses import LOGIT_SCALE
    from sharelock.pairs import Subset, split_per_dataset

    rng = np.random.default_rng(5)
    ids = [f"{i:05d}" for i in range(50)]
    write_store(tmp_path / "v2", ids, rng.normal(size=(50, 8)).astype(np.float32), "image", "vit")
    write_store(tmp_path / "t2", ids, rng.normal(size=(50, 12)).astype(np.float32), "text", "llm")
    datasets = [{"vision": str(stores / "v"), "text": [str(stores / "t0")]},
                {"vision": str(tmp_path / "v2"), "text": str(tmp_path / "t2")}]  # fmt: skip
    pairs = StorePairs(datasets)
    train_idx, val_idx = split_per_dataset(pairs, 6, seed=42)
    # by hand: random.Random(42) shuffles of range(120) and of range(50); the second dataset starts at row 120
    first, second = list(range(120)), list(range(50))
    random.Random(42).shuffle(first)
    random.Random(42).shuffle(second)
    assert val_idx.tolist() == first[:6] + [120 + i for i in second[:6]]
    assert train_idx.tolist() == first[6:] + [120 + i for i in second[6:]]
    # one dataset: the plain reference split
    single_train, single_val = split_per_dataset(StorePairs(datasets[:1]), 6, seed=42)
    assert single_val.tolist() == first[:6] and single_train.tolist() == first[6:]
    # val_size counts per dataset, so the smaller one is named when it cannot hold it
    with pytest.raises(ValueError, match=r"data.datasets\[1\] \(.*v2\): data.val_size=60 must be smaller .*\(50\)"):
        split_per_dataset(pairs, 60, seed=42)
    # fit validates on exactly these samples: with a one-layer text head (no BatchNorm statistics) the first
    # validation, before any optimizer step, is the loss of the freshly built heads on them
    extra = [f"data.datasets={json.dumps(datasets)}", "data.val_size=6", "model.text_layers=1", "optim.max_steps=1",
             "optim.accumulate_grad_batches=1", "val_check_interval=1", "checkpoint_every=1"]  # fmt: skip
    args = tiny_args(stores, tmp_path / "run", *extra)
    train.main(args)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000001" / "trainer_state.json").read_text())
    torch.manual_seed(42)
    model = train.build_model(load_config(args, "default"), pairs.vision_dim, pairs.text_dim)
    expected = train.validation_loss(model, Subset(pairs, val_idx), 16, LOGIT_SCALE, 42, "cpu")
    assert state["loop"]["history"][0]["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_train_size_keeps_nested_seeded_subsets(stores, tmp_path):
    from sharelock.pairs import subsample

    idx = np.arange(100, 200)
    small, large = subsample(idx, 10, 42), subsample(idx, 30, 42)
    assert len(small) == 10 and len(large) == 30 and list(small) == sorted(small)
    assert set(small) <= set(large) <= set(idx)  # nested: the points of one data-scaling curve share their samples
    assert np.array_equal(subsample(idx, 0.3, 42), large) and not np.array_equal(subsample(idx, 30, 7), large)
    assert np.array_equal(subsample(idx, None), idx) and np.array_equal(subsample(idx, 1.0), idx)
    for bad in (0, 101, 0.0, 1.5):
        with pytest.raises(ValueError, match="data.train_size"):
            subsample(idx, bad)
    full = train.main(tiny_args(stores, tmp_path / "full"))
    part = train.main(tiny_args(stores, tmp_path / "part", "data.train_size=32"))
    assert full["train_samples"] == 96 and part["train_samples"] == 32  # 120 pairs - 24 for validation


def test_train_size_of_every_pair_is_the_full_run(stores, tmp_path):
    from sharelock.pairs import subsample

    # the split hands over its training indices in shuffled order: a subset keeps that order, so train_size=1.0
    # (or the full count) trains on the same batches as train_size=null (the last point of a data-scaling curve)
    idx = np.random.default_rng(1).permutation(np.arange(100, 150))
    assert np.array_equal(subsample(idx, 50), idx) and np.array_equal(subsample(idx, 1.0), idx)
    part = subsample(idx, 20)
    assert np.array_equal(part, [i for i in idx if i in set(part)])  # the given order, not sorted
    full = train.main(tiny_args(stores, tmp_path / "full"))
    every = train.main(tiny_args(stores, tmp_path / "every", "data.train_size=1.0"))
    assert every["train_samples"] == full["train_samples"] == 96
    assert losses(tmp_path / "every") == losses(tmp_path / "full")


def test_no_validation_split_runs_without_validation(stores, tmp_path):
    """data.val_size=0 leaves no validation samples: nothing can be validated, so the run must neither record a
    validation loss (an empty mean is not a loss of 0) nor save a 'best' checkpoint nor stop early; it trains to
    max_steps and the last step checkpoint is the one a run directory resolves to."""
    from sharelock.models import resolve_checkpoint

    run = tmp_path / "noval"
    summary = train.main(tiny_args(stores, run, "data.val_size=0", "early_stopping.patience=1"))
    assert summary["step"] == 8 and summary["best_val_loss"] is None
    assert not (run / "checkpoints" / "best").exists()
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_000008"
    # a half-written checkpoint left by a killed run sorts after the complete one and must not be picked
    (run / "checkpoints" / "step_000008.tmp4242").mkdir()
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_000008"


def test_caption_rows_follow_each_store_and_samples_are_sorted_ids(tmp_path):
    """Each caption store is indexed with its own row numbers (stores written in different orders), and sample i is
    the i-th id in sorted order whatever order the vision store was written in."""
    rng = np.random.default_rng(3)
    ids = [f"{i:03d}" for i in range(30)]
    v = rng.normal(size=(30, 4)).astype(np.float32)
    t = [rng.normal(size=(30, 5)).astype(np.float32) for _ in range(2)]
    shuffled = [rng.permutation(30) for _ in range(3)]
    write_store(tmp_path / "v", [ids[i] for i in shuffled[0]], v[shuffled[0]], "image", "vit")
    for k in range(2):
        write_store(tmp_path / f"t{k}", [ids[i] for i in shuffled[k + 1]], t[k][shuffled[k + 1]], "text", "llm")
    pairs = StorePairs([{"vision": str(tmp_path / "v"), "text": [str(tmp_path / "t0"), str(tmp_path / "t1")]}])
    got_v, got_t = pairs.batch(np.arange(30), np.random.default_rng(0))
    torch.testing.assert_close(got_v, torch.from_numpy(v))  # ids sort as 000, 001, ...: row i is sample i
    from_0 = (got_t == torch.from_numpy(t[0])).all(1)
    from_1 = (got_t == torch.from_numpy(t[1])).all(1)
    assert bool((from_0 | from_1).all()) and from_0.any() and from_1.any()


def test_epochs_reshuffle_and_micro_batches_draw_their_own_captions(stores, tmp_path, monkeypatch):
    """Every epoch visits each training sample at most once in a new order, and every micro-batch (also within one
    accumulated step) gets its own caption draw."""
    calls = []
    batch = StorePairs.batch

    def recording(self, indices, rng):
        calls.append((np.asarray(indices).copy(), json.dumps(rng.bit_generator.state)))
        return batch(self, indices, rng)

    monkeypatch.setattr(StorePairs, "batch", recording)
    # no validation: every call is a training micro-batch; 120 samples / 16 = 7 micro-batches per epoch
    train.main(tiny_args(stores, tmp_path / "r", "data.val_size=0", "optim.max_steps=7", "checkpoint_every=100"))
    assert len(calls) == 14
    epochs = [np.concatenate([c[0] for c in calls[:7]]), np.concatenate([c[0] for c in calls[7:]])]
    for order in epochs:
        assert len(order) == len(set(order.tolist())) == 112
    assert not np.array_equal(epochs[0], epochs[1])
    assert len({state for _, state in calls}) == 14


def test_resume_rewrites_metrics_from_the_checkpoint_step(stores, tmp_path):
    """Records past the restart point are dropped, the checkpoint's own step is kept: one record per step."""
    run = tmp_path / "r"
    train.main(tiny_args(stores, run))
    shutil.rmtree(run / "checkpoints" / "step_000008")
    train.main(tiny_args(stores, run, "resume=latest"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_early_stop_is_checkpointed_and_a_resume_trains_no_further(stores, tmp_path):
    run = tmp_path / "es"
    args = tiny_args(stores, run, "early_stopping.patience=1", "early_stopping.min_delta=100", "checkpoint_every=100")
    args += ["val_check_interval=4", "optim.accumulate_grad_batches=1", "optim.max_steps=20"]
    assert train.main(args)["step"] == 8
    assert (run / "checkpoints" / "step_000008" / "trainer_state.json").is_file()
    assert train.main(args + ["resume=latest"])["step"] == 8


def test_run_cli_errors_are_one_line_and_a_missing_key_has_no_quotes(tmp_path):
    def raising(err):
        def main():
            raise err

        return main

    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(KeyError("checkpoint c.safetensors lacks head.weight")), "sharelock-eval")
    assert exit_.value.code == "sharelock-eval: error: checkpoint c.safetensors lacks head.weight"
    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(FileNotFoundError(f"{tmp_path / 'x.yaml'} does not exist")), "sharelock-eval")
    assert exit_.value.code == f"sharelock-eval: error: {tmp_path / 'x.yaml'} does not exist"
    with pytest.raises(ImportError):  # only the errors named: anything else keeps its traceback
        run_cli(raising(ImportError("no module named av")), "sharelock-eval")
    with pytest.raises(SystemExit, match="^sharelock-eval: error: no module named av$"):
        run_cli(raising(ImportError("no module named av")), "sharelock-eval", ImportError)
    worker = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    worker += '  File "w.py", line 1, in f\nValueError: x.jpg is not a readable image\n'
    with pytest.raises(SystemExit) as exit_:  # torch re-raises a worker's error with the worker's traceback
        run_cli(raising(ValueError(worker)), "sharelock-eval")
    assert exit_.value.code == "sharelock-eval: error: x.jpg is not a readable image"
    assert run_cli(lambda: 3, "sharelock-eval") is None


def test_a_bare_leaf_key_is_pointed_to_its_section():
    """difflib alone misses 'run_dir' -> 'train.run_dir' (ratio 0.7): keys with the same last part come first."""
    with pytest.raises(KeyError) as err:
        load_config(["--config", "tiny", "patience=3"], "tiny")
    assert "(did you mean early_stopping.patience?)" in str(err.value)


BAD_COUNTS = ["optim.batch_size=-4", "optim.batch_size=0", "optim.max_steps=0", "checkpoint_every=0", "log_every=2.5"]


@pytest.mark.parametrize("override", BAD_COUNTS)
def test_counts_that_are_not_positive_integers_are_errors_naming_the_key(stores, tmp_path, override):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"^{key.replace('.', '[.]')}={value}: expected a positive integer$"):
        train.main(tiny_args(stores, tmp_path / "r", override))
    assert not (tmp_path / "r" / "checkpoints").exists()  # nothing trained, no step_000000 of an untrained model


def test_a_finished_run_is_not_overwritten_by_a_fresh_start(stores, tmp_path):
    run = tmp_path / "r"
    train.main(tiny_args(stores, run, "optim.max_steps=4"))
    metrics, best = (run / "metrics.jsonl").read_text(), (run / "checkpoints" / "best" / "model.safetensors")
    best_bytes = best.read_bytes()
    with pytest.raises(ValueError, match=r"already holds the checkpoints of a run: continue it with --resume latest"):
        train.main(tiny_args(stores, run, "optim.max_steps=2"))
    assert (run / "metrics.jsonl").read_text() == metrics and best.read_bytes() == best_bytes
    assert train.main(tiny_args(stores, run, "optim.max_steps=4", "resume=latest"))["step"] == 4


def test_an_output_folder_that_is_a_file_is_an_error_naming_it(stores, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for run in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(ValueError, match=rf"output folder {run}: {tmp_path / 'file'} is a file"):
            train.main(tiny_args(stores, run))
    from sharelock import demo

    with pytest.raises(ValueError, match=rf"output folder {tmp_path / 'file'}: .* is a file"):
        demo.main(["--out", str(tmp_path / "file"), "--quick"])  # before any data is drawn
    assert (tmp_path / "file").read_text() == "not a folder"


def test_broken_checkpoints_are_errors_naming_the_file(stores, tmp_path):
    from sharelock.models import load_model

    run = tmp_path / "r"
    train.main(tiny_args(stores, run, "optim.max_steps=4"))
    step = run / "checkpoints" / "step_000004"
    # a checkpoint of other heads (model.hidden_dim 16 -> 8) cannot be resumed: its config.yaml names the key, and
    # without one the weights do not fit
    with pytest.raises(ValueError, match=rf"{step} was trained with other settings: model.hidden_dim=8 \(checkpoint"):
        train.main(tiny_args(stores, tmp_path / "other", f"resume={step}", "model.hidden_dim=8"))
    (step / "config.yaml").unlink()
    with pytest.raises(ValueError, match=rf"checkpoint {step} does not fit the heads of this config \(model\.\*\)"):
        train.main(tiny_args(stores, tmp_path / "other", f"resume={step}", "model.hidden_dim=8"))
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated copy
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        load_model(step)
    (step / "meta.json").write_text('{"model": {"vision_dim": 8')
    with pytest.raises(ValueError, match=rf"{step / 'meta.json'} is not valid JSON: .* at line 1, column 27"):
        load_model(step)


def test_resume_latest_without_a_checkpoint_and_past_the_end_are_errors(stores, tmp_path):
    """resume=latest in a folder without checkpoints started a new run (a misspelt run_dir went unnoticed), and a
    resume past optim.max_steps returned at once: both are errors, as in pin, neco, counting and dora."""
    with pytest.raises(FileNotFoundError, match=r"^resume=latest: no checkpoint under .*new/checkpoints \(leave"):
        train.main(tiny_args(stores, tmp_path / "new", "resume=latest"))
    assert not (tmp_path / "new" / "checkpoints").exists()
    run = tmp_path / "r"
    train.main(tiny_args(stores, run, "optim.max_steps=4"))
    with pytest.raises(ValueError, match=r"step_000004 is at step 4, past this run's end at optim.max_steps=2; raise"):
        train.main(tiny_args(stores, run, "optim.max_steps=2", "resume=latest"))


def test_non_finite_loss_is_a_one_line_error_of_the_command(stores, tmp_path, monkeypatch):
    args = tiny_args(stores, tmp_path / "r", f"data.datasets={nan_datasets(tmp_path)}")
    monkeypatch.setattr(sys, "argv", ["sharelock-train", *args])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    assert str(exit_.value.code).startswith("sharelock-train: error: non-finite training loss nan at step 0")


def test_a_refused_command_leaves_the_runs_config_yaml(stores, tmp_path):
    run = tmp_path / "r"
    train.main(tiny_args(stores, run, "optim.max_steps=4"))
    saved = (run / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="already holds the checkpoints of a run"):
        train.main(tiny_args(stores, run, "optim.max_steps=2"))
    with pytest.raises(ValueError, match="past this run's end"):
        train.main(tiny_args(stores, run, "optim.max_steps=2", "resume=latest"))
    with pytest.raises(ValueError, match=r"trained with other settings: model.hidden_dim=8 \(checkpoint: 16\)"):
        train.main(tiny_args(stores, run, "model.hidden_dim=8", "resume=latest"))
    assert (run / "config.yaml").read_bytes() == saved


def test_resume_with_other_settings_than_the_checkpoint_is_an_error_listing_them(stores, tmp_path):
    """Another seed or head normalisation resumed silently (another batch order, other heads); they are listed, while
    a longer run and another mixed precision resume as before."""
    run = tmp_path / "r"
    train.main(tiny_args(stores, run, "optim.max_steps=4", "seed=3", "model.vision_normalize=false"))
    with pytest.raises(ValueError) as err:
        train.main(tiny_args(stores, run, "resume=latest"))
    assert str(err.value) == (
        f"resume: {run}/checkpoints/step_000004 was trained with other settings: seed=42 (checkpoint: 3); "
        "model.vision_normalize=True (checkpoint: False); resume it with its run's config (--config "
        f"{run}/checkpoints/step_000004/config.yaml) or the same overrides"
    )
    args = ["seed=3", "model.vision_normalize=false", "mixed_precision=no", "resume=latest"]
    assert train.main(tiny_args(stores, run, *args))["step"] == 8


def test_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    """Past the zero padding, sorting names put step_1000000 before step_999999; temp and stray folders are no steps."""
    from sharelock.models import resolve_checkpoint
    from sharelock.training import latest_checkpoint

    for name in ("step_999999", "step_1000000", "step_1000001.tmp4242", "step_notes", ".old_step_1000002"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == "step_1000000"
    assert resolve_checkpoint(tmp_path).name == "step_1000000"


def test_resume_auto_starts_a_new_run_or_continues_the_latest(stores, tmp_path):
    """resume=auto (requeued jobs repeat one command): a fresh start in a folder without checkpoints, else exactly
    resume=latest; resume=latest itself stays an error without a checkpoint."""
    straight = tmp_path / "straight"
    train.main(tiny_args(stores, straight))
    fresh = tmp_path / "fresh"
    assert train.main(tiny_args(stores, fresh, "resume=auto"))["step"] == 8
    assert losses(fresh) == losses(straight)
    for run, resume in ((tmp_path / "latest", "latest"), (tmp_path / "auto", "auto")):
        shutil.copytree(straight / "checkpoints" / "step_000004", run / "checkpoints" / "step_000004")
        train.main(tiny_args(stores, run, f"resume={resume}"))
        np.testing.assert_allclose(losses(run), losses(straight)[4:], rtol=1e-6, atol=1e-6)
    a = load_file(str(tmp_path / "latest" / "checkpoints" / "step_000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "auto" / "checkpoints" / "step_000008" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="resume=latest: no checkpoint"):
        train.main(tiny_args(stores, tmp_path / "none", "resume=latest"))


def folders(path):
    return sorted(p.name for p in path.iterdir())


def best_step(folder):
    return json.loads((folder / "best" / "meta.json").read_text())["step"]


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(stores, tmp_path):
    """The checkpoints past a resume's step belong to an abandoned trajectory: they move to checkpoints/abandoned/,
    so that pruning keeps the new run's own and resume=auto continues it."""
    run, ckpts = tmp_path / "r", tmp_path / "r" / "checkpoints"
    train.main(tiny_args(stores, run, "optim.max_steps=4", "checkpoint_every=1", "keep_checkpoints=null"))
    assert best_step(ckpts) == 2
    resume = f"resume={ckpts / 'step_000001'}"
    train.main(tiny_args(stores, run, "optim.max_steps=3", "checkpoint_every=1", "keep_checkpoints=1", resume))
    assert folders(ckpts) == ["abandoned", "best", "step_000003"]
    assert folders(ckpts / "abandoned") == ["best", "step_000002", "step_000003", "step_000004"]
    assert best_step(ckpts / "abandoned") == best_step(ckpts) == 2  # the new trajectory's validation wrote its own
    assert "set aside 4 checkpoints past step 1 in" in (run / "log.txt").read_text()
    train.main(tiny_args(stores, run, "optim.max_steps=6", "checkpoint_every=1", "resume=auto"))
    assert f"resumed from {ckpts / 'step_000003'} at step 3" in (run / "log.txt").read_text()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert folders(ckpts) == ["abandoned", "best", "step_000004", "step_000005", "step_000006"]


def test_a_best_past_the_resume_step_is_set_aside_one_at_or_before_it_stays(stores, tmp_path):
    """`best` of an abandoned trajectory must not outlive it: a resumed run's best comes from its own validations (the
    run folder falls back to its latest step until one is written)."""
    from sharelock.models import resolve_checkpoint

    run, ckpts = tmp_path / "r", tmp_path / "r" / "checkpoints"
    args = tiny_args(stores, run, "checkpoint_every=1", "keep_checkpoints=null")
    train.main([*args, "optim.max_steps=4"])
    assert best_step(ckpts) == 2
    no_validation = "val_check_interval=100"
    train.main([*args, "optim.max_steps=4", no_validation, f"resume={ckpts / 'step_000002'}"])
    assert best_step(ckpts) == 2 and folders(ckpts / "abandoned") == ["step_000003", "step_000004"]
    train.main([*args, "optim.max_steps=2", no_validation, f"resume={ckpts / 'step_000001'}"])
    assert folders(ckpts) == ["abandoned", "step_000001", "step_000002"]
    assert folders(ckpts / "abandoned") == ["best", "step_000002", "step_000003", "step_000004"]
    assert best_step(ckpts / "abandoned") == 2 and resolve_checkpoint(run) == ckpts / "step_000002"


def test_the_best_value_goes_with_a_best_set_aside(stores, tmp_path):
    """After `best` is set aside, the next validation of the resumed trajectory writes `best`, however it compares
    with the abandoned one (a worse logit scale makes it compare worse)."""
    run, ckpts = tmp_path / "r", tmp_path / "r" / "checkpoints"
    args = tiny_args(stores, run, "checkpoint_every=1", "keep_checkpoints=null", "val_check_interval=1")
    train.main([*args, "optim.max_steps=4"])
    assert best_step(ckpts) > 2
    train.main([*args, "optim.max_steps=3", "loss.log_logit_scale=6", f"resume={ckpts / 'step_000002'}"])
    assert best_step(ckpts) in (2, 3) and best_step(ckpts / "abandoned") > 2


def test_a_fresh_run_may_start_beside_checkpoints_set_aside_but_not_beside_steps_or_best(stores, tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints" / "abandoned" / "step_000004").mkdir(parents=True)
    assert train.main(tiny_args(stores, run, "optim.max_steps=1"))["step"] == 1
    with pytest.raises(ValueError, match="already holds the checkpoints of a run"):
        train.main(tiny_args(stores, run, "optim.max_steps=1"))


def test_keep_checkpoints_prunes_all_but_the_newest_steps(stores, tmp_path):
    from sharelock.training import prune_checkpoints

    def steps(run):
        return sorted(p.name for p in (run / "checkpoints").iterdir())

    run = tmp_path / "r"
    train.main(tiny_args(stores, run, "optim.max_steps=5", "checkpoint_every=1", "keep_checkpoints=2"))
    assert steps(run) == ["best", "step_000004", "step_000005"]
    assert train.main(tiny_args(stores, run, "optim.max_steps=6", "checkpoint_every=1", "keep_checkpoints=2",
                                "resume=latest"))["step"] == 6  # fmt: skip
    assert steps(run) == ["best", "step_000005", "step_000006"]
    every = tmp_path / "all"
    train.main(tiny_args(stores, every, "optim.max_steps=5", "checkpoint_every=1", "keep_checkpoints=null"))
    assert steps(every) == ["best"] + [f"step_00000{i}" for i in range(1, 6)]
    prune_checkpoints(every, 2)  # `best` is no step checkpoint: never pruned
    assert steps(every) == ["best", "step_000004", "step_000005"]
    with pytest.raises(ValueError, match=r"^keep_checkpoints=0: expected a positive integer or null$"):
        train.main(tiny_args(stores, tmp_path / "bad", "keep_checkpoints=0"))


def test_eval_stores_are_checked_before_training_and_run_after_it(stores, tmp_path):
    """eval.features / eval.class_features: one without the other, a missing or unlabelled store is an error before
    the first step (it was a silent no-op, or an error after the whole run); both give top-1/top-5 in the summary."""
    rng = np.random.default_rng(2)
    test, classes = tmp_path / "test", tmp_path / "classes"
    with FeatureWriter(test, "vit", "image", 8, shard_size=64) as w:
        w.add([str(i) for i in range(20)], rng.normal(size=(20, 8)).astype(np.float32), [i % 4 for i in range(20)])
    write_store(classes, [str(c) for c in range(4)], rng.normal(size=(4, 12)).astype(np.float32), "text", "llm")
    bad = [
        (
            [f"eval.features={test}"],
            "^eval.features='.*': the zero-shot test after training needs eval.class_features$",
        ),
        ([f"eval.class_features={classes}"], "needs eval.features$"),
        ([f"eval.features={tmp_path / 'nope'}", f"eval.class_features={classes}"], "no feature store at .*nope"),
        ([f"eval.features={stores / 'v'}", f"eval.class_features={classes}"], "^eval.features='.*': .* no labels"),
    ]
    for k, (extra, message) in enumerate(bad):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train.main(tiny_args(stores, tmp_path / f"bad{k}", *extra))
        assert not (tmp_path / f"bad{k}" / "metrics.jsonl").exists(), extra
    run = tmp_path / "run"
    summary = train.main(tiny_args(stores, run, f"eval.features={test}", f"eval.class_features={classes}"))
    assert 0 <= summary["top1"] <= summary["top5"] == 100  # 4 classes: top-5 is top-4
    assert json.loads((run / "summary.json").read_text())["top1"] == summary["top1"]


def test_mixed_precision_on_cpu_is_said_to_train_in_float32(stores, tmp_path, monkeypatch):
    """Without CUDA, mixed_precision is dropped (CPU autocast is slow): the log says so instead of nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train.main(tiny_args(stores, tmp_path / "r", "optim.max_steps=1", "mixed_precision=bf16"))
    assert (
        "mixed_precision=bf16 needs a GPU: this CPU run trains in float32" in (tmp_path / "r" / "log.txt").read_text()
    )


def test_resume_keeps_the_global_batch_however_it_is_split(stores, tmp_path):
    """The global batch (batch x accumulation x processes) must match the checkpoint's, not its parts: half the
    micro-batch with twice the accumulation resumes (as two processes without accumulation would), another global
    batch is an error naming both."""
    run = tmp_path / "r"
    train.main(tiny_args(stores, run, "optim.max_steps=4"))  # tiny_args: batch 16 x accumulation 2
    assert json.loads((run / "checkpoints" / "step_000004" / "meta.json").read_text())["global_batch"] == 32
    with pytest.raises(ValueError, match=r"other settings: global batch 16 = optim.batch_size x .* \(checkpoint: 32\)"):
        train.main(tiny_args(stores, run, "optim.max_steps=6", "optim.accumulate_grad_batches=1", "resume=latest"))
    split = ["optim.max_steps=6", "optim.batch_size=8", "optim.accumulate_grad_batches=4", "resume=latest"]
    assert train.main(tiny_args(stores, run, *split))["step"] == 6
