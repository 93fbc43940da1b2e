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


@pytest.fixture()
def write_object_pool():
    """A writer of object-pool folders `<root>/<name>/<k>.png`: opaque RGBA cut-outs, a grey level per instance."""
    import numpy as np
    from PIL import Image

    def write(root, names, per_class: int = 3):
        for name in names:
            (root / name).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                arr = np.zeros((12, 20, 4), np.uint8)
                arr[..., :3], arr[..., 3] = 40 * k + 60, 255
                Image.fromarray(arr).save(root / name / f"{k}.png")
        return root

    return write
