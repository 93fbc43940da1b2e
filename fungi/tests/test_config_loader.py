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
