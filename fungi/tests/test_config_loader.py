import yaml

from fungi.config import ConfigLoader, parse_value


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides():
    # plain YAML 1.1 (yaml.safe_load) reads 1e-4 as a string; user configs write it that way
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    text = "lr: 1e-4\nwd: -2.5E-2\nsteps: 100\nname: e5\nbetas: [0.9, 1e-3]\nrun: 1e3x"
    assert yaml.load(text, Loader=ConfigLoader) == {
        "lr": 1e-4, "wd": -0.025, "steps": 100, "name": "e5", "betas": [0.9, 0.001], "run": "1e3x"
    }  # fmt: skip
    assert parse_value("1e-3") == 0.001 and parse_value("[1e-3, 2]") == [0.001, 2] and parse_value("abc") == "abc"


def test_command_line_slips_are_errors_as_in_the_other_packages():
    import pytest

    from fungi import extract
    from fungi.config import resolve

    with pytest.raises(ValueError, match=r"^batch_size=True: expected a number \(default 16\)$"):
        resolve(["--config", "tiny", "batch_size=true"], extract.DEFAULTS, None)  # a flag is an int to Python: 1
    with pytest.raises(FileNotFoundError, match=r"^config '' not found"):
        resolve(["--config="], extract.DEFAULTS, None)  # an empty $CFG was silently no config


def test_the_commands_name_themselves_and_the_bare_defaults_are_a_one_line_error(monkeypatch):
    import sys

    import pytest

    from fungi import train

    monkeypatch.setattr(sys, "argv", ["fungi-train", "nosuch=1"])
    with pytest.raises(SystemExit, match=r"^fungi-train: error: unknown config key 'nosuch'"):  # was fungi-extract
        train.cli()
    monkeypatch.setattr(sys, "argv", ["fungi-train"])  # no config, no data.root: a TypeError traceback before
    with pytest.raises(SystemExit, match=r"^fungi-train: error: data\.root is not set: give data\.root=FOLDER"):
        train.cli()


def test_the_demo_names_itself_in_its_usage_errors(capsys):
    import pytest

    from fungi import demo

    with pytest.raises(SystemExit) as exc:
        demo.main(["--nosuch"])
    assert (
        exc.value.code == 2 and "fungi-demo: error: unrecognized arguments: --nosuch" in capsys.readouterr().err
    )  # demo.py


def test_a_text_key_keeps_the_text_typed_and_a_file_must_quote_yes_or_no(tmp_path):
    import pytest

    from fungi import extract
    from fungi.config import resolve

    # YAML 1.1 reads yes/no/on/off as booleans (a run folder named True) and 1e3 as 1000.0: a text key keeps the text
    names = [resolve([f"name={w}"], extract.DEFAULTS, None)["name"] for w in ("yes", "off", "1e3")]
    assert names == ["yes", "off", "1e3"]
    assert resolve(["--config", "paper", "layer=on"], extract.DEFAULTS, None)["layer"] == "on"  # a config's text
    (tmp_path / "mine.yaml").write_text("name: no\n")
    with pytest.raises(ValueError, match=r'^name: no/off/false reads as false, but name holds text .*: name: "no"$'):
        resolve(["--config", str(tmp_path / "mine.yaml")], extract.DEFAULTS, None)


def test_null_or_an_empty_value_is_refused_for_a_number_or_text_key_unless_it_means_something(tmp_path):
    import pytest

    from fungi import eval as eval_mod
    from fungi import extract, hummingbird
    from fungi.config import _flatten, config_path, load_yaml, resolve

    with pytest.raises(ValueError, match=r"^kl\.temperature=null: expected a number, not null or an empty value"):
        resolve(["kl.temperature="], extract.DEFAULTS, None)  # an empty $T: a traceback in the loss
    with pytest.raises(ValueError, match=r"^name=null: expected text, not null .* \(default 'default'\)$"):
        resolve(["name=null"], extract.DEFAULTS, None)
    (tmp_path / "mine.yaml").write_text("simclr:\n  num_negatives:\n")
    with pytest.raises(ValueError, match=r"^simclr\.num_negatives=null: expected a number"):
        resolve(["--config", str(tmp_path / "mine.yaml")], extract.DEFAULTS, None)
    # null is checked against the command's default: the paper config's layer is null (the last block) by default
    cfg = resolve(["--config", "paper", "layer=", "data.val_split=", "run_dir="], extract.DEFAULTS, None)
    assert cfg["layer"] is None and cfg["data"]["val_split"] is None and cfg["run_dir"] is None
    assert resolve(["val_split="], eval_mod.DEFAULTS, None)["val_split"] is None
    # a shipped config's null means something: its command takes it as an override too
    shipped = {"paper": extract, "retrieval": extract, "text": extract, "audio": extract, "tiny": extract}
    shipped |= {"hummingbird_tiny": hummingbird, "hummingbird_efficient": hummingbird}
    for name, command in shipped.items():
        nulls = [k for k, v in _flatten(load_yaml(config_path(name))).items() if v is None]
        assert all(_flatten(resolve([f"{k}="], command.DEFAULTS, None))[k] is None for k in nulls)


def test_false_is_none_for_a_text_key_whose_null_means_something():
    from fungi import extract
    from fungi.config import resolve

    cfg = resolve(["--config", "tiny", "data.val_split=false"], extract.DEFAULTS, None)
    assert cfg["data"]["val_split"] is None  # as null: no validation split, as before text keys kept the text typed


def test_a_text_key_left_null_keeps_the_text_typed_and_false_or_null_leave_it_unset(tmp_path):
    import pytest

    from fungi import eval as fungi_eval
    from fungi import extract
    from fungi.config import resolve

    # run_dir is null in the defaults: YAML reads 2024 as a number, off as false and on as true
    assert resolve(["run_dir=2024"], extract.DEFAULTS, None)["run_dir"] == "2024"
    for word in ("off", "no", "", "null"):  # the default run folder, as an empty value
        assert resolve([f"run_dir={word}"], extract.DEFAULTS, None)["run_dir"] is None
    with pytest.raises(ValueError, match=r"^run_dir=True: expected text \(a path or name\), or null$"):
        resolve(["run_dir=on"], extract.DEFAULTS, None)
    assert resolve(["out=1e3"], fungi_eval.DEFAULTS, None)["out"] == "1e3"
    (tmp_path / "mine.yaml").write_text("run_dir: 2024\ndata: {root: no}\n")
    cfg = resolve(["--config", str(tmp_path / "mine.yaml")], extract.DEFAULTS, None)
    assert cfg["run_dir"] == "2024" and cfg["data"]["root"] is None
