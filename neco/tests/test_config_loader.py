import pytest
import yaml

from neco.checkpoint import resolve_resume
from neco.config import ConfigLoader, load_config, parse_value


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
