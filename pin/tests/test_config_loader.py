import yaml

from pin.config import ConfigLoader, parse_value


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides():
    # plain YAML 1.1 (yaml.safe_load) reads 1e-4 as a string; user configs write it that way
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    text = "lr: 1e-4\nwd: -2.5E-2\nsteps: 100\nname: e5\nbetas: [0.9, 1e-3]\nrun: 1e3x"
    assert yaml.load(text, Loader=ConfigLoader) == {
        "lr": 1e-4, "wd": -0.025, "steps": 100, "name": "e5", "betas": [0.9, 0.001], "run": "1e3x"
    }  # fmt: skip
    assert parse_value("1e-3") == 0.001 and parse_value("[1e-3, 2]") == [0.001, 2] and parse_value("abc") == "abc"


def test_mixed_precision_no_stays_the_string_accelerate_expects(tmp_path):
    from pin.config import load_config

    # YAML 1.1 reads an unquoted `no` as False, which accelerate refuses; other keys keep their booleans
    cfg, _ = load_config(["config=tiny", "train.mixed_precision=no", "pin.learned_table=no"])
    assert cfg["train"]["mixed_precision"] == "no" and cfg["pin"]["learned_table"] is False
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config([f"config={tmp_path / 'c.yaml'}"])[0]["train"]["mixed_precision"] == "no"


def test_an_override_or_config_file_of_the_wrong_kind_is_a_value_error_naming_the_key(tmp_path):
    import pytest

    from pin.config import load_config

    with pytest.raises(ValueError, match=r"^train\.batch_size='four': expected a number \(default 4\)$"):
        load_config(["--config", "tiny", "train.batch_size=four"])
    with pytest.raises(ValueError, match=r"^optim\.lr=\[0\.1, 0\.2\]: expected a number"):
        load_config(["--config", "tiny", "optim.lr=[0.1,0.2]"])
    with pytest.raises(ValueError, match=r"^pin\.learned_table='maybe': expected true or false$"):
        load_config(["--config", "tiny", "pin.learned_table=maybe"])
    assert load_config(["--config", "tiny", "name=2024"])[0]["name"] == "2024"  # a string key keeps a string
    (tmp_path / "mine.yaml").write_text("train: 5\n")
    with pytest.raises(ValueError, match=r"^train=5: train is a section; set its keys"):
        load_config(["--config", str(tmp_path / "mine.yaml")])
    # what the keys take stays accepted: null, an int for a float, a list or `default` for the held-out classes
    cfg, _ = load_config(["--config", "tiny", "train.val_every_epochs=null", "optim.lr=1", "data.held_out=default"])
    assert cfg["train"]["val_every_epochs"] is None and cfg["data"]["held_out"] == "default"
    assert load_config(["data.held_out=[cat]"])[0]["data"]["held_out"] == ["cat"]


def test_invalid_yaml_in_an_override_or_a_config_file_is_a_value_error_naming_it(tmp_path):
    import pytest

    from pin.config import load_config

    # a yaml.YAMLError is no ValueError: the CLIs printed a multi-line traceback instead of a one-line error
    with pytest.raises(ValueError, match=r"^eval\.datasets: '\[synthetic' is not valid YAML \(expected ','"):
        load_config(["--config", "tiny", "eval.datasets=[synthetic"])
    with pytest.raises(ValueError, match=r"^eval\.checkpoint: '\.\.\.' is not valid YAML"):
        load_config(["--config", "tiny", "eval.checkpoint=..."])  # the README's placeholder typed as it is
    (tmp_path / "mine.yaml").write_text("name: [x\n")
    with pytest.raises(ValueError, match=r"mine\.yaml is not valid YAML: expected ',' or '\]'.* at line 2, column 1$"):
        load_config(["--config", str(tmp_path / "mine.yaml")])


def test_a_bare_word_for_a_list_or_null_for_a_flag_is_a_value_error_as_in_the_other_packages(tmp_path):
    import pytest

    from pin.config import load_config

    with pytest.raises(ValueError, match=r"^eval\.datasets='coco': expected a list, e.g. eval\.datasets=\[coco\]$"):
        load_config(["--config", "tiny", "eval.datasets=coco"])  # would read as the datasets c, o, c, o
    with pytest.raises(ValueError, match=r"^pin\.learned_table=None: expected true or false$"):
        load_config(["--config", "tiny", "pin.learned_table=null"])  # null read as false
    (tmp_path / "mine.yaml").write_text("data:\n  procedural_classes: circle\n")
    with pytest.raises(ValueError, match=r"^data\.procedural_classes='circle': expected a list"):
        load_config(["--config", str(tmp_path / "mine.yaml")])


def test_a_stray_positional_argument_is_a_one_line_error_naming_the_command(monkeypatch):
    import sys

    import pytest

    from pin import eval as eval_mod
    from pin import localise, train

    for cli, prog, message in [
        (train.cli, "pin-train", "pin-train takes key=value overrides only, got ['foo']"),
        (eval_mod.cli, "pin-eval", "pin-eval takes key=value overrides only, got ['foo']"),
        (localise.cli, "pin-localise", 'usage: pin-localise IMAGE "object name" checkpoint=PATH'),
    ]:
        monkeypatch.setattr(sys, "argv", [prog, "--config", "tiny", "foo"])
        with pytest.raises(SystemExit) as exc:  # the message alone before, without the command and "error:"
            cli()
        assert str(exc.value.code).startswith(f"{prog}: error: {message}")


def test_a_text_key_keeps_the_text_typed_and_a_file_must_quote_yes_or_no(tmp_path):
    import pytest

    from pin.config import load_config

    # YAML 1.1 reads yes/no/on/off as booleans (a run folder named True) and 1e3 as 1000.0: a text key keeps the text
    assert [load_config([f"name={w}"])[0]["name"] for w in ("yes", "off", "1e3")] == ["yes", "off", "1e3"]
    assert load_config(["train.mixed_precision=no", "out_dir=on"])[0]["out_dir"] == "on"
    # the command-line switches are paths or `latest`: the text typed (1e3 stays 1e3); empty, null or false: unset
    for unset in ("", "null", "~", "false", "no", "Off"):
        assert load_config([f"resume={unset}"], flags=("resume",))[0]["_cli"] == {"resume": None}
    assert load_config(["resume=latest", "out=1e3"], flags=("resume", "out"))[0]["_cli"] == {
        "resume": "latest",
        "out": "1e3",
    }
    (tmp_path / "mine.yaml").write_text("name: no\n")
    with pytest.raises(ValueError, match=r'^name: no/off/false reads as false, but name holds text .*: name: "no"$'):
        load_config(["--config", str(tmp_path / "mine.yaml")])


def test_null_or_an_empty_value_is_refused_for_a_number_or_text_key_unless_it_means_something(tmp_path):
    import pytest

    from pin.config import _flat_keys, get_key, load_config

    with pytest.raises(ValueError, match=r"^optim\.lr=null: expected a number, not null or an empty value \(default"):
        load_config(["optim.lr="])  # an empty $LR was '' and failed deep in the optimizer
    with pytest.raises(ValueError, match=r"^name=null: expected text, not null .* \(default 'blip2_pin'\)$"):
        load_config(["name=~"])
    (tmp_path / "mine.yaml").write_text("train:\n  batch_size:\n")
    with pytest.raises(ValueError, match=r"^train\.batch_size=null: expected a number"):
        load_config(["--config", str(tmp_path / "mine.yaml")])
    cfg, _ = load_config(["train.val_every_epochs=", "data.held_out=", "train.max_steps="])
    assert cfg["train"]["val_every_epochs"] is None and cfg["data"]["held_out"] is None
    # a null of a shipped config means something there: the other shipped configs take it too
    cfgs = {
        name: load_config(["--config", name])[0] for name in ("blip2", "llava", "openflamingo", "paligemma", "tiny")
    }
    nulls = {k for cfg in cfgs.values() for k in _flat_keys(cfg) if get_key(cfg, k) is None}
    assert {"data.objects", "data.backgrounds", "data.synonyms_path"} <= nulls
    for name, cfg in cfgs.items():
        for key in sorted(k for k in nulls if isinstance(get_key(cfg, k), int | float | str)):
            assert get_key(load_config(["--config", name, f"{key}="])[0], key) is None


def test_a_users_copy_of_the_tiny_config_loads_as_the_shipped_one(tmp_path):
    from pin.config import config_path, load_config

    copy = tmp_path / "my_tiny.yaml"
    copy.write_text(config_path("tiny").read_text())
    mine, _ = load_config(["--config", str(copy)])
    shipped, _ = load_config(["--config", "tiny"])
    assert mine["model"]["tiny"] == {"patch_size": 28, "width": 32}
    for section in ("model", "pin", "data", "train"):  # eval.roots: an empty mapping in a user's file keeps defaults
        assert mine[section] == shipped[section]


def test_false_is_no_for_mixed_precision_and_none_for_a_text_key_whose_null_means_something():
    from pin.config import load_config

    for word in ("no", "off", "false", "No"):  # mixed_precision=off meant "no" before text keys kept the text typed
        assert load_config([f"train.mixed_precision={word}"])[0]["train"]["mixed_precision"] == "no"
    cfg = load_config(["--config", "blip2", "data.val_backgrounds=false"])[0]  # as null: data.backgrounds
    assert cfg["data"]["val_backgrounds"] is None
    cfg = load_config(["--config", "tiny", "data.backgrounds=false", "model.image_size=false"])[0]  # null defaults
    assert cfg["data"]["backgrounds"] is None and cfg["model"]["image_size"] is None


def test_a_text_key_left_null_keeps_the_text_typed_and_false_or_null_leave_it_unset(tmp_path):
    import pytest

    from pin.config import load_config

    # eval.checkpoint is null in every config: YAML reads 2024 as a number, off as false and on as true
    assert load_config(["eval.checkpoint=2024"])[0]["eval"]["checkpoint"] == "2024"
    for word in ("off", "no", "", "null"):
        assert load_config([f"eval.checkpoint={word}"])[0]["eval"]["checkpoint"] is None
    with pytest.raises(ValueError, match=r"^eval\.checkpoint=True: expected text \(a path or name\), or null$"):
        load_config(["eval.checkpoint=on"])
    with pytest.raises(ValueError, match=r"^data\.backgrounds=True: expected text"):  # null in tiny.yaml
        load_config(["--config", "tiny", "data.backgrounds=yes"])
    (tmp_path / "mine.yaml").write_text("eval:\n  checkpoint: 2024\n")
    assert load_config(["--config", str(tmp_path / "mine.yaml")])[0]["eval"]["checkpoint"] == "2024"
