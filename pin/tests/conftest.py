"""Shared fixtures."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
