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
