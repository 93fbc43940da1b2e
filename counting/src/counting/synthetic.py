"""Procedural object pool (shapes with exact masks) and backgrounds (noise + scikit-image photos) for tests/demo."""

from __future__ import annotations

import numpy as np
import torch

from counting.pools import TensorBackgroundPool, TensorObjectPool
from counting.resize import resize_image

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "ellipse", "hexagon")
PALETTE = (
    (0.9, 0.2, 0.2),
    (0.2, 0.8, 0.3),
    (0.2, 0.4, 0.95),
    (0.95, 0.85, 0.2),
    (0.8, 0.3, 0.85),
    (0.2, 0.85, 0.9),
    (0.75, 0.75, 0.75),
    (0.55, 0.35, 0.15),
)


def shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (size, size) mask of a randomly rotated / stretched shape filling most of the canvas."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    stretch = rng.uniform(0.75, 1.0)
    u = ((xx - c) * np.cos(angle) + (yy - c) * np.sin(angle)) / (0.45 * size)
    v = (-(xx - c) * np.sin(angle) + (yy - c) * np.cos(angle)) / (0.45 * size * stretch)
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if kind == "disc":
        return np.hypot(xx - c, yy - c) <= 0.45 * size
    if kind == "ellipse":
        return np.hypot(u, v / 0.6) <= 1
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == "triangle":
        return (v >= -0.6) & (v <= 0.9 - 1.7 * np.abs(u))
    if kind == "star":
        return r <= 0.55 + 0.4 * np.cos(5 * theta)
    if kind == "ring":
        d = np.hypot(xx - c, yy - c) / (0.45 * size)
        return (d <= 1) & (d >= 0.55)
    if kind == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if kind == "hexagon":
        return np.maximum(np.abs(u) * 0.866 + np.abs(v) * 0.5, np.abs(v)) <= 0.85
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def draw_object(kind: str, colour: tuple[float, float, float], size: int, rng: np.random.Generator):
    """(3, size, size) image in [0, 1] and its exact mask: a shaded, noisy shape on a noise surround."""
    mask = shape_mask(kind, size, rng)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    light = rng.uniform(0, 2 * np.pi)
    shading = 0.8 + 0.25 * (np.cos(light) * (xx - 0.5) + np.sin(light) * (yy - 0.5))
    fill = np.asarray(colour)[:, None, None] * shading * rng.uniform(0.85, 1.1)
    fill = fill + rng.normal(0, 0.04, size=(3, size, size))
    surround = rng.uniform(0, 1, size=(3, 1, 1)) + rng.normal(0, 0.2, size=(3, size, size))
    image = np.where(mask, fill, surround).clip(0, 1)
    return torch.from_numpy(image).float(), torch.from_numpy(mask)


def synthetic_object_pool(num_types: int = 16, per_type: int = 24, size: int = 64, seed: int = 0) -> TensorObjectPool:
    """``num_types`` object types (shape x colour), ``per_type`` instances each; cluster id = type id."""
    rng = np.random.default_rng(seed)
    combos = [(s, c) for c in range(len(PALETTE)) for s in SHAPES]
    if num_types > len(combos):
        raise ValueError(f"at most {len(combos)} object types, got {num_types}")
    order = rng.permutation(len(combos))[:num_types]
    images, masks, ids = [], [], []
    for type_id, combo in enumerate(order):
        kind, colour = combos[combo][0], PALETTE[combos[combo][1]]
        for _ in range(per_type):
            image, mask = draw_object(kind, colour, size, rng)
            images.append(image)
            masks.append(mask)
            ids.append(type_id)
    return TensorObjectPool(images, masks, ids)


def skimage_backgrounds() -> list[torch.Tensor]:
    """A few scikit-image sample photos and textures as (3, H, W) tensors in [0, 1] (all ship with scikit-image)."""
    import skimage.data as data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "grass", "gravel", "brick", "camera", "moon"):
        image = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out.append(torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1))
    return out


def synthetic_backgrounds(
    num_noise: int = 8, size: int = 128, seed: int = 0, with_skimage: bool = True
) -> TensorBackgroundPool:
    """Smooth colour-noise backgrounds (+ scikit-image photos, resized to ``size``)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_noise):
        coarse = torch.from_numpy(rng.uniform(0, 1, size=(3, 4, 4))).float()
        smooth = resize_image(coarse, (size, size))
        images.append((smooth + torch.from_numpy(rng.normal(0, 0.08, size=(3, size, size))).float()).clamp(0, 1))
    if with_skimage:
        images += [resize_image(img, (size, size), antialias=True) for img in skimage_backgrounds()]
    return TensorBackgroundPool(images)
