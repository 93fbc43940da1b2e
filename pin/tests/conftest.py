"""Shared fixtures. Also undoes the shadowing of the installed `pin` package by pytest's importlib mode.

With `--import-mode=importlib`, pytest names these modules `pin.tests.*` and registers the folder `<repo>/pin` as a
namespace package `pin`, which hides the real package in `pin/src/pin`.
"""

import importlib
import os
import sys

import pytest
import torch

_shadow = sys.modules.get("pin")
if _shadow is not None and getattr(_shadow, "__file__", None) is None:
    del sys.modules["pin"]
    _real = importlib.import_module("pin")
    if "pin.tests" in sys.modules:
        _real.tests = sys.modules["pin.tests"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

SHAPES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="session")
def codec():
    from pin.boxes import GridCodec

    return GridCodec()


@pytest.fixture()
def tiny_blip2(codec):
    """A fresh tiny random BLIP-2 (frozen) with a word-level tokenizer knowing the shape names."""
    from pin.zoo import build_vlm

    return build_vlm("tiny-blip2", class_names=SHAPES, codec=codec, tiny_options={"patch_size": 28})
