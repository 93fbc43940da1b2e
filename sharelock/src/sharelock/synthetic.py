"""Synthetic captioned images: coloured shapes on a plain background, several caption files, a labelled split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def draw_shape(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """One image of a large, roughly centred coloured shape on a light background; returns (image, size word)."""
    background = tuple(int(x) for x in rng.integers(200, 256, 3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    rel = rng.uniform(0.3, 0.45)
    r = int(size * rel)
    cx, cy = (int(v) for v in size / 2 + rng.integers(-4, 5, 2))
    jitter = rng.integers(-20, 21, 3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img, "big" if rel > 0.375 else "small"


def caption_variants(colour: str, shape: str, size_word: str) -> list[str]:
    """Two alternative captions of one image (two caption files, as for datasets with several caption sources).
    The second uses the "a photo of a ..." phrasing common in web alt-texts: a tiny random LLM cannot bridge an
    unseen phrasing on its own, unlike a pretrained one."""
    return [f"there is one {size_word} {colour} {shape}", f"a photo of a {colour} {shape}"]


def make_dataset(root: str | Path, n_train: int = 600, n_test: int = 240, seed: int = 0, size: int = 64) -> dict:
    """Write `root/images/*.png` + `captions_a.json` / `captions_b.json` (training pairs), `root/test/<class>/*.png`
    (labelled, ImageFolder layout) and `root/class_names.json`. Returns the paths."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    caps: list[dict[str, str]] = [{}, {}]
    for i in range(n_train):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        img, size_word = draw_shape(colour, shape, rng, size)
        name = f"{i:06d}.png"
        img.save(root / "images" / name)
        for k, text in enumerate(caption_variants(colour, shape, size_word)):
            caps[k][name] = text
    for k, name in enumerate(("captions_a.json", "captions_b.json")):
        (root / name).write_text(json.dumps(caps[k], indent=0))
    folders = [c.replace(" ", "_") for c in CLASSES]
    for i in range(n_test):
        c = i % len(CLASSES)
        colour, shape = CLASSES[c].split()
        (root / "test" / folders[c]).mkdir(parents=True, exist_ok=True)
        draw_shape(colour, shape, rng, size)[0].save(root / "test" / folders[c] / f"{i:06d}.png")
    # ImageFolder sorts folder names: store names keyed by folder so the label order always matches
    (root / "class_names.json").write_text(json.dumps(dict(zip(folders, CLASSES)), indent=0))
    return {
        "images": root / "images",
        "captions": [root / "captions_a.json", root / "captions_b.json"],
        "test": root / "test",
        "class_names": root / "class_names.json",
    }


def vocabulary_texts() -> list[str]:
    """Every word the synthetic captions and prompts use (to build the demo's word-level tokenizer)."""
    words = [*COLOURS, *SHAPES, *SIZES, "there is one", "a photo of a", "A photo of a"]
    return [" ".join(words)]
