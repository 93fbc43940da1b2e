from pathlib import Path

import pytest
import yaml

from counting.config import ConfigLoader, config_dir, flatten, load_config, parse_value


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides():
    # plain YAML 1.1 (yaml.safe_load) reads 1e-4 as a string; user configs write it that way
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    text = "lr: 1e-4\nwd: -2.5E-2\nsteps: 100\nname: e5\nbetas: [0.9, 1e-3]\nrun: 1e3x"
    assert yaml.load(text, Loader=ConfigLoader) == {
        "lr": 1e-4, "wd": -0.025, "steps": 100, "name": "e5", "betas": [0.9, 0.001], "run": "1e3x"
    }  # fmt: skip
    assert parse_value("1e-3") == 0.001 and parse_value("[1e-3, 2]") == [0.001, 2] and parse_value("abc") == "abc"


def test_mixed_precision_no_stays_the_string_accelerate_expects(tmp_path):
    # plain YAML reads an unquoted `no` as False; accelerate only accepts the string "no"
    cfg, _ = load_config(["--config", "tiny", "train.mixed_precision=no"])
    assert cfg["train"]["mixed_precision"] == "no"
    text = (Path(str(config_dir() / "tiny.yaml"))).read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    assert "mixed_precision: no\n" in text
    (tmp_path / "c.yaml").write_text(text)
    cfg, _ = load_config(["--config", str(tmp_path / "c.yaml")])
    assert cfg["train"]["mixed_precision"] == "no"
    cfg, _ = load_config(["--config", "tiny", "train.mixed_precision=bf16"])
    assert cfg["train"]["mixed_precision"] == "bf16"


def test_overrides_of_the_wrong_kind_are_errors_naming_the_key():
    """A word, list or mapping for a number, a scalar for a list, and YAML's `{key:value}` (one key, no value) were
    tracebacks deep in training, or silently ignored; figures=NAME stays one image."""
    with pytest.raises(ValueError, match="train.batch_size='abc': expected a number"):
        load_config(["--config", "tiny", "train.batch_size=abc"])
    with pytest.raises(ValueError, match=r"stride=\[1, 2\]: expected a number"):
        load_config(["stride=[1, 2]"], default="eval")
    with pytest.raises(ValueError, match=r"optim.betas=0.9: expected a list"):
        load_config(["optim.betas=0.9"])
    with pytest.raises(ValueError, match="'{drop_path_rate:0.1}': YAML reads 'key:value' without a space as one key"):
        load_config(["model.backbone_kwargs={drop_path_rate:0.1}"])
    cfg, _ = load_config(["figures=c.jpg", "max_images=2"], default="eval")
    assert cfg["figures"] == "c.jpg" and cfg["max_images"] == 2
    assert load_config(["name=2024"])[0]["name"] == "2024"  # a string key keeps a string (Path / 2024 failed)
    assert load_config(["model.backbone_kwargs={drop_path_rate: 0.1}"])[0]["model"]["backbone_kwargs"] == {
        "drop_path_rate": 0.1
    }


def test_a_flag_takes_only_true_or_false():
    """A misspelt `false` was a non-empty string, so true: `train.shared_mask=flase` turned the ablation on."""
    with pytest.raises(ValueError, match="train.shared_mask='flase': expected true or false"):
        load_config(["--config", "tiny", "train.shared_mask=flase"])
    with pytest.raises(ValueError, match="pretrained=1: expected true or false"):
        load_config(["pretrained=1"], default="preprocess")
    assert load_config(["train.shared_mask=true", "model.pretrained=false"])[0]["train"]["shared_mask"] is True


def test_invalid_yaml_in_an_override_or_a_config_file_is_a_value_error_naming_it(tmp_path):
    """A yaml.YAMLError is no ValueError: the CLIs printed PyYAML's multi-line traceback instead of one line."""
    with pytest.raises(ValueError, match=r"^cannot parse '\[x' as a YAML value: expected ',' or '\]'"):
        load_config(["--config", "tiny", "name=[x"])
    (tmp_path / "mine.yaml").write_text("name: [x\n")
    with pytest.raises(ValueError, match=r"mine\.yaml is not valid YAML \(.*expected ',' or '\]'"):
        load_config(["--config", str(tmp_path / "mine.yaml")])


def test_command_line_and_config_file_slips_are_errors_as_in_the_other_packages(tmp_path):
    with pytest.raises(ValueError, match=r"^train\.epochs=True: expected a number$"):
        load_config(["train.epochs=true"])  # a flag is an int to Python: one epoch
    with pytest.raises(ValueError, match=r"^train\.shared_mask=None: expected true or false$"):
        load_config(["train.shared_mask=null"])  # null read as false
    with pytest.raises(ValueError, match=r"^optim=3: optim is a section; set its keys, e.g. optim\.lr=\.\.\.$"):
        load_config(["optim=3"])  # was "unknown config key 'optim'"
    with pytest.raises(ValueError, match=r"^option --output_dir expects a value$"):
        load_config(["--output_dir", "--seed=3"])  # output_dir was the text '--seed=3'
    with pytest.raises(FileNotFoundError, match=r"^config '' not found"):
        load_config(["--config="])  # an empty $CFG ran the paper recipe
    mine = tmp_path / "mine.yaml"  # a user's file is checked as the overrides are (it reached training unchecked)
    for text, error in [
        ("optim: {lr: abc}\n", r"^optim\.lr='abc': expected a number$"),
        ("optim: 3\n", r"^optim=3: optim is a section"),
        ("train: {shared_mask: flase}\n", r"^train\.shared_mask='flase': expected true or false$"),
    ]:
        mine.write_text(text)
        with pytest.raises(ValueError, match=error):
            load_config(["--config", str(mine)])
    mine.write_text("optim: {lr: 1.0e-3, betas: [0.5, 0.9]}\ntrain: {max_steps: 3}\n")
    cfg, _ = load_config(["--config", str(mine)])
    assert cfg["optim"]["betas"] == [0.5, 0.9] and cfg["train"]["max_steps"] == 3 and cfg["seed"] == 9832


def test_a_stray_positional_argument_is_a_one_line_error_naming_the_command(monkeypatch):
    import sys

    from counting import eval as eval_mod
    from counting import preprocess, train

    for cli, prog, message in [
        (train.cli, "counting-train", "unexpected arguments ['foo']; use key=value overrides"),
        (eval_mod.cli, "counting-eval", "unexpected arguments ['foo']; use key=value overrides"),
        (preprocess.cli, "counting-preprocess", "expected one step: masks, clusters or all; got ['foo']"),
    ]:
        monkeypatch.setattr(sys, "argv", [prog, "foo"])
        with pytest.raises(SystemExit) as exc:  # the message alone before, without the command and "error:"
            cli()
        assert str(exc.value.code).startswith(f"{prog}: error: {message}")


def test_a_text_key_keeps_the_text_typed_and_a_file_must_quote_yes_or_no(tmp_path):
    # YAML 1.1 reads yes/no/on/off as booleans (a run folder named True) and 1e3 as 1000.0: a text key keeps the text
    assert [load_config([f"name={w}"])[0]["name"] for w in ("yes", "off", "1e3")] == ["yes", "off", "1e3"]
    assert load_config(["train.mixed_precision=no", "output_dir=on"])[0]["output_dir"] == "on"
    (tmp_path / "mine.yaml").write_text("name: yes\n")
    with pytest.raises(ValueError, match=r'^name: yes/on/true reads as true, but name holds text .*: name: "yes"$'):
        load_config(["--config", str(tmp_path / "mine.yaml")])


def test_null_or_an_empty_value_is_refused_for_a_number_or_text_key_unless_it_means_something(tmp_path):
    with pytest.raises(ValueError, match=r"^optim\.lr=null: expected a number, not null or an empty value \(default"):
        load_config(["optim.lr="])  # an empty $LR was '' and failed deep in the schedule
    with pytest.raises(ValueError, match=r"^name=null: expected text, not null .* \(default 'uncountr_vitb16'\)$"):
        load_config(["name=null"])
    (tmp_path / "mine.yaml").write_text("train:\n  batch_size:\n")
    with pytest.raises(ValueError, match=r"^train\.batch_size=null: expected a number"):
        load_config(["--config", str(tmp_path / "mine.yaml")])
    cfg, _ = load_config(["resume=", "data.image_root=~"])
    assert cfg["resume"] is None and cfg["data"]["image_root"] is None  # resume= was '', data.image_root= too
    assert load_config(["max_images="], default="eval")[0]["max_images"] is None
    # a null of a shipped config means something there: the other configs of its command take it too
    cfgs = {name: load_config(["--config", name])[0] for name in ("uncountr", "uncountr_vitb8", "tiny")}
    nulls = {k for cfg in cfgs.values() for k, v in flatten(cfg).items() if v is None}
    for name, cfg in cfgs.items():
        for key in sorted(k for k, v in flatten(cfg).items() if k in nulls and isinstance(v, int | float | str)):
            assert flatten(load_config(["--config", name, f"{key}="])[0])[key] is None


def test_false_is_no_for_mixed_precision_and_null_standard_size_means_the_actual_size():
    for word in ("no", "off", "false", "No"):  # mixed_precision=off meant "no" before text keys kept the text typed
        assert load_config([f"train.mixed_precision={word}"])[0]["train"]["mixed_precision"] == "no"
    assert load_config(["train.standard_size=null"])[0]["train"]["standard_size"] is None


def test_a_text_key_left_null_keeps_the_text_typed_and_false_or_null_leave_it_unset(tmp_path):
    # resume is null in every training config: YAML reads 2024 as a number, off as false and on as true
    assert load_config(["resume=2024"])[0]["resume"] == "2024"
    for word in ("off", "no", "", "null"):  # a fresh run, as an empty value
        assert load_config([f"resume={word}"])[0]["resume"] is None
    with pytest.raises(ValueError, match=r"^resume=True: expected text \(a path or name\), or null$"):
        load_config(["resume=on"])
    (tmp_path / "mine.yaml").write_text("resume: 2024\nmodel: {checkpoint_path: no}\n")
    cfg = load_config(["--config", str(tmp_path / "mine.yaml")])[0]
    assert cfg["resume"] == "2024" and cfg["model"]["checkpoint_path"] is None
