"""Shared fixtures. Also undoes pytest's importlib-mode shadowing of the installed ``neco`` package.

With ``--import-mode=importlib`` pytest names this folder's modules ``neco.tests.*`` and registers the source
folder ``<repo>/neco`` as a namespace package ``neco``, hiding the real package in ``neco/src/neco``.
"""

import importlib
import os
import sys

import pytest
import torch

_shadow = sys.modules.get("neco")
if _shadow is not None and getattr(_shadow, "__file__", None) is None:
    del sys.modules["neco"]
    _real = importlib.import_module("neco")
    _tests = sys.modules.get("neco.tests")
    if _tests is not None:
        _real.tests = _tests

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
