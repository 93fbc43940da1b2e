import pytest
import yaml

from neco.checkpoint import resolve_resume
from neco.config import ConfigLoader, _flat_keys, get_key, load_config, parse_value, run_cli


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides():
    # plain YAML 1.1 (yaml.safe_load) reads 1e-4 as a string; user configs write it that way
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    text = "lr: 1e-4\nwd: -2.5E-2\nsteps: 100\nname: e5\nbetas: [0.9, 1e-3]\nrun: 1e3x"
    assert yaml.load(text, Loader=ConfigLoader) == {
        "lr": 1e-4, "wd": -0.025, "steps": 100, "name": "e5", "betas": [0.9, 0.001], "run": "1e3x"
    }  # fmt: skip
    assert parse_value("1e-3") == 0.001 and parse_value("[1e-3, 2]") == [0.001, 2] and parse_value("abc") == "abc"


def test_resume_errors_name_the_train_resume_key(tmp_path):
    # the README and the error messages must name the override that exists (train.resume), not a "--resume" flag
    assert load_config(["--config", "tiny", "train.resume=latest"])["train"]["resume"] == "latest"
    assert load_config(["--config", "tiny", "--train.resume", "latest"])["train"]["resume"] == "latest"
    with pytest.raises(KeyError, match="unknown config key 'resume'"):
        load_config(["--config", "tiny", "--resume", "latest"])
    with pytest.raises(FileNotFoundError, match=r"^train\.resume=latest: no checkpoint under"):
        resolve_resume("latest", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"^train\.resume='.*' is not a checkpoint directory"):
        resolve_resume(str(tmp_path), str(tmp_path))


def test_mixed_precision_no_stays_the_string_accelerate_expects(tmp_path):
    # YAML 1.1 reads an unquoted `no` as False, which accelerate refuses; other false values stay booleans
    cfg = load_config(["--config", "tiny", "train.mixed_precision=no", "loss.use_teacher=no"])
    assert cfg["train"]["mixed_precision"] == "no" and cfg["loss"]["use_teacher"] is False
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(["--config", str(tmp_path / "c.yaml")])["train"]["mixed_precision"] == "no"
    assert load_config(["--config", "tiny", "train.mixed_precision=bf16"])["train"]["mixed_precision"] == "bf16"


def test_a_config_file_may_set_some_keys_the_rest_keep_the_defaults(tmp_path):
    """A user's file is laid over the default config (the paper recipe; eval_voc for neco-eval); a key the default
    lacks is an error naming it, with the closest valid key."""
    (tmp_path / "mine.yaml").write_text("optim:\n  batch_size: 8\nloss:\n  network: odd_even\n")
    cfg = load_config(["--config", str(tmp_path / "mine.yaml")])
    paper = load_config([])
    assert cfg["optim"]["batch_size"] == 8 and cfg["loss"]["network"] == "odd_even"
    assert cfg["val"] == paper["val"] and cfg["optim"]["lr_backbone"] == paper["optim"]["lr_backbone"]
    (tmp_path / "eval.yaml").write_text("evals: [linear]\nlinear:\n  epochs: 2\n")
    ecfg = load_config(["--config", str(tmp_path / "eval.yaml")], default="eval_voc")
    assert ecfg["linear"]["epochs"] == 2 and ecfg["linear"]["lr"] == 0.01 and ecfg["data"]["dataset"] == "voc"
    (tmp_path / "typo.yaml").write_text("optim:\n  bach_size: 8\n")
    with pytest.raises(KeyError, match=r"^unknown config key 'optim.bach_size' \(did you mean optim.batch_size\?\)"):
        load_config(["--config", str(tmp_path / "typo.yaml")])


def test_run_cli_errors_are_one_line_and_a_missing_key_has_no_quotes(tmp_path):
    def raising(err):
        def main():
            raise err

        return main

    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(KeyError("checkpoint c.safetensors lacks head.weight")), "neco-eval")
    assert exit_.value.code == "neco-eval: error: checkpoint c.safetensors lacks head.weight"
    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(FileNotFoundError(f"{tmp_path / 'x.yaml'} does not exist")), "neco-eval")
    assert exit_.value.code == f"neco-eval: error: {tmp_path / 'x.yaml'} does not exist"
    with pytest.raises(ImportError):  # only the errors named: anything else keeps its traceback
        run_cli(raising(ImportError("no module named av")), "neco-eval")
    with pytest.raises(SystemExit, match="^neco-eval: error: no module named av$"):
        run_cli(raising(ImportError("no module named av")), "neco-eval", ImportError)
    worker = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    worker += '  File "w.py", line 1, in f\nValueError: x.jpg is not a readable image\n'
    with pytest.raises(SystemExit) as exit_:  # torch re-raises a worker's error with the worker's traceback
        run_cli(raising(ValueError(worker)), "neco-eval")
    assert exit_.value.code == "neco-eval: error: x.jpg is not a readable image"
    assert run_cli(lambda: 3, "neco-eval") is None


def test_a_bare_leaf_key_is_pointed_to_its_section():
    """difflib alone misses 'run_dir' -> 'train.run_dir' (ratio 0.7): keys with the same last part come first."""
    with pytest.raises(KeyError) as err:
        load_config(["--config", "tiny", "run_dir=x"])
    assert "(did you mean train.run_dir?)" in str(err.value)


def test_overrides_may_add_keys_to_an_empty_mapping_of_the_config_only():
    """An empty mapping (model.overrides, free-form keyword arguments) takes new keys one by one; elsewhere a new key
    is still an error."""
    cfg = load_config(["model.overrides.img_size=96", "model.overrides.drop_path_rate=0.2"])
    assert cfg["model"]["overrides"] == {"img_size": 96, "drop_path_rate": 0.2}
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(["model.overridez.img_size=96"])
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(["optim.lr_head.x=1"])


def test_values_of_the_wrong_kind_are_errors_naming_the_key(tmp_path):
    """A word or a list for a number, or a bare string for a list, used to fail deep in training (int('four'),
    str - float) or to read 'hummingbird' as its letters."""
    with pytest.raises(ValueError, match=r"^optim.batch_size='four': expected a number \(default 4\)$"):
        load_config(["--config", "tiny", "optim.batch_size=four"])
    with pytest.raises(ValueError, match=r"^optim.lr_backbone=\[1, 2\]: expected a number"):
        load_config(["--config", "tiny", "optim.lr_backbone=[1,2]"])
    with pytest.raises(ValueError, match=r"^evals='linear': expected a list, e.g. evals=\[linear\]$"):
        load_config(["--config", "eval_tiny", "evals=linear"])
    with pytest.raises(ValueError, match=r"^cannot parse '\[4' as a YAML value: expected ',' or '\]'"):
        load_config(["--config", "tiny", "optim.batch_size=[4"])
    cfg = load_config(["--config", "tiny", "optim.max_steps=3", "val.every_epochs=null", "optim.final_lr=0"])
    assert cfg["optim"]["max_steps"] == 3 and cfg["val"]["every_epochs"] is None  # null and int for float stay fine
    assert load_config(["--config", "tiny", "name=2024"])["name"] == "2024"  # os.path.join(..., 2024) failed
    with pytest.raises(ValueError, match=r"^loss.use_teacher='flase': expected true or false$"):
        load_config(["--config", "tiny", "loss.use_teacher=flase"])  # a non-empty string read as true before
    (tmp_path / "mine.yaml").write_text("optim:\n  batch_size: eight\n")
    with pytest.raises(ValueError, match=r"^optim.batch_size='eight': expected a number"):
        load_config(["--config", str(tmp_path / "mine.yaml")])


def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path):
    (tmp_path / "list.yaml").write_text("- optim.batch_size=8\n")
    with pytest.raises(ValueError, match=r"list.yaml: expected a YAML mapping of config keys at top level, got list$"):
        load_config(["--config", str(tmp_path / "list.yaml")])
    (tmp_path / "broken.yaml").write_text("optim: {batch_size: 8\n")
    with pytest.raises(ValueError, match=r"broken.yaml: not valid YAML \(while parsing a flow mapping .*line 1"):
        load_config(["--config", str(tmp_path / "broken.yaml")])
    (tmp_path / "section.yaml").write_text("optim: 8\n")
    with pytest.raises(ValueError, match=r"^optim: 8 in the config file, but optim is a section of keys$"):
        load_config(["--config", str(tmp_path / "section.yaml")])
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(["--config", str(tmp_path / "empty.yaml")]) == load_config([]) | {
        "config_path": str(tmp_path / "empty.yaml")
    }


def test_command_line_slips_are_errors_as_in_the_other_packages():
    with pytest.raises(ValueError, match=r"^optim\.epochs=True: expected a number \(default 25\)$"):
        load_config(["optim.epochs=true"])  # a flag is an int to Python: it ran one epoch
    with pytest.raises(ValueError, match=r"^option --train\.run_dir needs a value$"):
        load_config(["--train.run_dir", "--seed=3"])  # run_dir was the text '--seed=3'
    with pytest.raises(FileNotFoundError, match=r"^config '' not found"):
        load_config(["--config="])  # an empty $CFG ran the paper recipe


def test_the_demo_names_itself_in_its_usage_errors(capsys):
    import pytest

    from neco import demo

    with pytest.raises(SystemExit) as exc:
        demo.main(["--nosuch"])
    assert (
        exc.value.code == 2 and "neco-demo: error: unrecognized arguments: --nosuch" in capsys.readouterr().err
    )  # demo.py


def test_a_text_key_keeps_the_text_typed_and_a_file_must_quote_yes_or_no(tmp_path):
    # YAML 1.1 reads yes/no/on/off as booleans (a run folder named True) and 1e3 as 1000.0: a text key keeps the text
    assert [load_config([f"name={w}"])["name"] for w in ("yes", "off", "1e3")] == ["yes", "off", "1e3"]
    cfg = load_config(["train.mixed_precision=no", "loss.use_teacher=no", "train.run_dir=/tmp/x"])
    assert cfg["train"]["mixed_precision"] == "no" and cfg["loss"]["use_teacher"] is False  # a flag keeps YAML's
    (tmp_path / "mine.yaml").write_text("name: on\n")
    with pytest.raises(ValueError, match=r'^name: yes/on/true reads as true, but name holds text .*: name: "yes"$'):
        load_config(["--config", str(tmp_path / "mine.yaml")])


def test_null_or_an_empty_value_is_refused_for_a_number_or_text_key_unless_it_means_something(tmp_path):
    with pytest.raises(ValueError, match=r"^optim\.lr_head=null: expected a number, not null or an empty value"):
        load_config(["optim.lr_head="])  # an empty $LR: a traceback in the schedule
    with pytest.raises(ValueError, match=r"^name=null: expected text, not null .* \(default 'neco_dinov2r_vits14'\)$"):
        load_config(["name=null"])
    (tmp_path / "mine.yaml").write_text("optim:\n  batch_size:\n")
    with pytest.raises(ValueError, match=r"^optim\.batch_size=null: expected a number"):
        load_config(["--config", str(tmp_path / "mine.yaml")])
    cfg = load_config(["train.keep_checkpoints=", "val.every_epochs=~", "model.checkpoint=", "train.resume="])
    assert cfg["train"]["keep_checkpoints"] is None and cfg["val"]["every_epochs"] is None
    # a null of a shipped config means something there: the other configs of its command take it too
    for names in (["dinov2r_vits14", "tiny", "leopart_vits16", "timetuning_vits16"], ["eval_voc", "eval_tiny"]):
        cfgs = {name: load_config(["--config", name]) for name in names}
        nulls = {k for cfg in cfgs.values() for k in _flat_keys(cfg) if get_key(cfg, k) is None}
        for name, cfg in cfgs.items():
            for key in sorted(k for k in nulls if isinstance(get_key(cfg, k), int | float | str)):
                assert get_key(load_config(["--config", name, f"{key}="]), key) is None


def test_false_is_no_for_mixed_precision():
    for word in ("no", "off", "false", "No"):  # mixed_precision=off meant "no" before text keys kept the text typed
        assert load_config([f"train.mixed_precision={word}"])["train"]["mixed_precision"] == "no"


def test_false_is_null_for_a_key_whose_null_means_something_whatever_its_default():
    assert load_config(["--config", "tiny", "data.root=false"])["data"]["root"] is None  # null in tiny.yaml
    assert load_config(["data.root=false"])["data"]["root"] is None  # a path in the paper config
    with pytest.raises(ValueError, match="expected a number"):
        load_config(["train.keep_checkpoints=false"])  # a number key: false is no count


def test_a_text_key_left_null_keeps_the_text_typed_and_false_or_null_leave_it_unset(tmp_path):
    from neco.export import main as export

    # train.run_dir is null in every training config: YAML reads 2024 as a number, off as false and on as true
    assert load_config(["train.run_dir=2024", "train.resume=latest"])["train"]["run_dir"] == "2024"
    for word in ("off", "no", "", "null"):  # the default run folder, as an empty value
        assert load_config([f"train.run_dir={word}"])["train"]["run_dir"] is None
    with pytest.raises(ValueError, match=r"^train\.run_dir=True: expected text \(a path or name\), or null$"):
        load_config(["train.run_dir=on"])
    with pytest.raises(ValueError, match=r"^output=True: expected text"):  # before the checkpoint is looked for
        export(["checkpoint=missing", "output=yes"])
    (tmp_path / "c.yaml").write_text("train:\n  run_dir: 2024\n  resume: no\n")
    cfg = load_config(["--config", str(tmp_path / "c.yaml")])["train"]
    assert cfg["run_dir"] == "2024" and cfg["resume"] is None
