import yaml

from sharelock.config import ConfigLoader, parse_value


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides():
    # plain YAML 1.1 (yaml.safe_load) reads 1e-4 as a string; user configs write it that way
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    text = "lr: 1e-4\nwd: -2.5E-2\nsteps: 100\nname: e5\nbetas: [0.9, 1e-3]\nrun: 1e3x"
    assert yaml.load(text, Loader=ConfigLoader) == {
        "lr": 1e-4, "wd": -0.025, "steps": 100, "name": "e5", "betas": [0.9, 0.001], "run": "1e3x"
    }  # fmt: skip
    assert parse_value("1e-3") == 0.001 and parse_value("[1e-3, 2]") == [0.001, 2] and parse_value("abc") == "abc"


def test_mixed_precision_no_stays_the_string_accelerate_expects():
    from sharelock.config import load_config

    # YAML 1.1 reads an unquoted `no` as False, which accelerate refuses; other keys keep their booleans
    cfg = load_config(["mixed_precision=no", "data.in_memory=no"], "default")
    assert cfg["mixed_precision"] == "no" and cfg["data"]["in_memory"] is False
    assert load_config(["mixed_precision=bf16"], "default")["mixed_precision"] == "bf16"


def test_malformed_yaml_in_an_override_or_a_config_file_is_a_value_error_naming_it(tmp_path):
    import pytest

    from sharelock.config import load_config

    with pytest.raises(ValueError, match=r"data\.datasets: '\[\{vision: /a, text: \[/b\]' is not valid YAML"):
        load_config(["data.datasets=[{vision: /a, text: [/b]"], "default")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim: {lr: 1\n")
    with pytest.raises(ValueError, match=r"config file .*bad\.yaml is not valid YAML: .*line 3"):
        load_config(["--config", str(bad)], "default")
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"config file .*bad\.yaml must hold a mapping of keys to values, not a list"):
        load_config(["--config", str(bad)], "default")


def test_an_override_or_config_file_of_the_wrong_kind_is_a_value_error_naming_the_key(tmp_path):
    import pytest

    from sharelock.config import load_config

    with pytest.raises(ValueError, match=r"^optim\.max_steps='three': expected a number \(default 5000\)$"):
        load_config(["optim.max_steps=three"], "default")
    with pytest.raises(ValueError, match=r"^optim\.batch_size=\[8, 16\]: expected a number"):
        load_config(["optim.batch_size=[8,16]"], "default")
    with pytest.raises(ValueError, match=r"^data\.in_memory='maybe': expected true or false$"):
        load_config(["data.in_memory=maybe"], "default")
    assert load_config(["name=2024"], "default")["name"] == "2024"  # a string key keeps a string (Path / 2024 failed)
    user = tmp_path / "user.yaml"
    user.write_text("optim: 5\n")
    with pytest.raises(ValueError, match=r"^optim=5: optim is a section; set its keys"):
        load_config(["--config", str(user)], "default")
    # what the keys take stays accepted: null, an int for a float, a fraction for a count, `no` for mixed precision
    cfg = load_config(["optim.lr=1", "data.val_size=0.5", "data.train_size=0.5", "run_dir=null", "mixed_precision=no"],
                      "default")  # fmt: skip
    assert cfg["optim"]["lr"] == 1 and cfg["data"]["val_size"] == 0.5 and cfg["mixed_precision"] == "no"
    for name in ("tiny", "cc3m", "cc12m", "cc3m_cc12m"):  # the packaged configs, laid over default.yaml
        load_config(["--config", name], "default")


def test_command_line_slips_are_errors_as_in_the_other_packages():
    import pytest

    from sharelock.config import load_config

    with pytest.raises(ValueError, match=r"^data\.datasets='store': expected a list, e.g. data\.datasets=\[store\]$"):
        load_config(["data.datasets=store"], "default")  # would read as the stores s, t, o, r, e
    with pytest.raises(ValueError, match=r"^data\.in_memory=None: expected true or false$"):
        load_config(["data.in_memory=null"], "default")  # null read as false
    with pytest.raises(ValueError, match=r"^option --run_dir expects a value$"):
        load_config(["--run_dir", "--seed=3"], "default")  # run_dir was the text '--seed=3'
    with pytest.raises(FileNotFoundError, match=r"^config '' not found"):
        load_config(["--config="], "default")  # an empty $CFG ran the paper recipe


def test_the_demo_names_itself_in_its_usage_errors(capsys):
    import pytest

    from sharelock import demo

    with pytest.raises(SystemExit) as exc:
        demo.main(["--nosuch"])
    assert (
        exc.value.code == 2 and "sharelock-demo: error: unrecognized arguments: --nosuch" in capsys.readouterr().err
    )  # demo.py


def test_a_text_key_keeps_the_text_typed_and_a_file_must_quote_yes_or_no(tmp_path):
    import pytest

    from sharelock.config import load_config

    # YAML 1.1 reads yes/no/on/off as booleans (a run folder named True) and 1e3 as 1000.0: a text key keeps the text
    assert [load_config([f"name={w}"], "default")["name"] for w in ("yes", "off", "1e3")] == ["yes", "off", "1e3"]
    assert load_config(["mixed_precision=no", "run_dir=/tmp/x"], "default")["mixed_precision"] == "no"
    user = tmp_path / "user.yaml"
    user.write_text("name: yes\n")
    with pytest.raises(ValueError, match=r'^name: yes/on/true reads as true, but name holds text .*: name: "yes"$'):
        load_config(["--config", str(user)], "default")
    user.write_text("mixed_precision: no\nname: '2024'\n")
    assert load_config(["--config", str(user)], "default")["mixed_precision"] == "no"


def test_null_or_an_empty_value_is_refused_for_a_number_or_text_key_unless_it_means_something(tmp_path):
    import pytest

    from sharelock.config import load_config

    with pytest.raises(ValueError, match=r"^optim\.lr=null: expected a number, not null or an empty value \(default"):
        load_config(["optim.lr="], "default")  # an empty $LR: a traceback deep in the optimizer
    with pytest.raises(ValueError, match=r"^name=null: expected text, not null .* \(default 'sharelock-cc3m'\)$"):
        load_config(["name=null"], "default")
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  batch_size:\n")
    with pytest.raises(ValueError, match=r"^optim\.batch_size=null: expected a number"):
        load_config(["--config", str(user)], "default")
    # an empty value is null, as in a YAML file; the NULLABLE keys and the keys whose default is null take it
    cfg = load_config(["resume=", "optim.grad_clip=", "data.train_size=~"], "default")
    assert cfg["resume"] is None and cfg["optim"]["grad_clip"] is None and cfg["data"]["train_size"] is None
    assert load_config(["language.dtype=", "vision.dtype=null"], "convert")["language"]["dtype"] is None
    assert load_config(["split="], "eval")["split"] is None


def test_false_is_no_for_mixed_precision_and_none_for_a_text_key_whose_null_means_something():
    from sharelock.config import load_config

    for word in ("no", "off", "false", "No"):  # mixed_precision=off meant "no" before text keys kept the text typed
        assert load_config([f"mixed_precision={word}"], "default")["mixed_precision"] == "no"
    assert load_config(["model.embedding_dim=null"], "default")["model"]["embedding_dim"] is None  # the vision size


def test_a_text_key_left_null_keeps_the_text_typed_and_false_or_null_leave_it_unset(tmp_path):
    import pytest

    from sharelock.config import load_config

    # run_dir is null in default.yaml: YAML reads 2024 as a number, off as false and on as true
    assert load_config(["run_dir=2024", "resume=latest"], "default")["run_dir"] == "2024"
    for word in ("off", "no", "", "null"):  # the default run folder, as an empty value
        assert load_config([f"run_dir={word}"], "default")["run_dir"] is None
    with pytest.raises(ValueError, match=r"^run_dir=True: expected text \(a path or name\), or null$"):
        load_config(["run_dir=on"], "default")
    user = tmp_path / "user.yaml"
    user.write_text("run_dir: 2024\nresume: no\n")
    cfg = load_config(["--config", str(user)], "default")
    assert cfg["run_dir"] == "2024" and cfg["resume"] is None
    # a flag left null is no text key: convert's model.vision_normalize=no is false, not unset
    assert load_config(["model.vision_normalize=no"], "convert")["model"]["vision_normalize"] is False
