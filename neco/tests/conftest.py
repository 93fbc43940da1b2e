"""Shared fixtures."""

import pytest


@pytest.fixture
def tiny_args(tmp_path):
    """Overrides for a very small training run on synthetic data."""
    return [
        "--config",
        "tiny",
        f"train.run_dir={tmp_path / 'run'}",
        "data.synthetic_images=8",
        "optim.batch_size=2",
        "data.num_local=2",
    ]


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hugging Face Hub offline with an empty cache: pretrained timm weights are unavailable, as on a machine with
    no network."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
