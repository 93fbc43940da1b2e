import pytest
import torch
from safetensors.torch import load_file

from pin import train as train_mod
from pin.config import load_config


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


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = train_mod.training_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "training_loss", flaky)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_mod.main(["--config", "tiny", f"out_dir={tmp_path}"])
    assert (tmp_path / "tiny" / "checkpoints" / "step_0000002" / "weights.safetensors").is_file()
    assert not (tmp_path / "tiny" / "checkpoints" / "step_0000003").exists()


def test_config_errors():
    with pytest.raises(KeyError, match="unknown config key 'optim.lrr'.*optim.lr"):
        load_config(["--config", "tiny", "optim.lrr=1"])
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


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        train_mod.main(["--config", "tiny", f"out_dir={tmp_path}", "--resume", "latest"])
