"""Test-time counting protocol of UnCounTR (from CounTR): sliding windows, 3x3 tiling, exemplar normalisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from counting import DENSITY_SCALING
from counting.resize import resize_image

DensityFn = Callable[[torch.Tensor], torch.Tensor]


def window_starts(width: int, window: int, stride: int) -> list[int]:
    """Left edges of the windows: 0, stride, 2*stride, ... while the window fits, plus one flush with the right edge."""
    if width <= window:
        return [0]
    starts = list(range(0, width - window + 1, stride))
    if starts[-1] != width - window:
        starts.append(width - window)
    return starts


def sliding_window(density_fn: DensityFn, image: torch.Tensor, window: int = 384, stride: int = 128) -> torch.Tensor:
    """Density (H, W) of a (1, 3, H, W) image with H = window, from square windows slid along x.

    ``density_fn`` maps (1, 3, window, window) to (1, window, window). Overlapping predictions are summed and divided
    by the per-pixel number of windows covering the pixel. An image narrower than the window is zero-padded on the
    right and the prediction cropped back (the reference's loop fails on such images).
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, 3, H, W), got {tuple(image.shape)}")
    _, _, height, width = image.shape
    if height != window:
        raise ValueError(f"image height must equal the window ({window}); got {height} (resize it first)")
    if stride < 1:
        raise ValueError(f"stride must be a positive number of pixels, got {stride}")
    if width < window:
        padded = F.pad(image, (0, window - width))
        return density_fn(padded).reshape(window, window)[:, :width]
    total = torch.zeros(height, width, device=image.device)
    coverage = torch.zeros(width, device=image.device)
    for start in window_starts(width, window, stride):
        out = density_fn(image[..., start : start + window]).reshape(window, window)
        total[:, start : start + window] += out.float()
        coverage[start : start + window] += 1
    return total / coverage


def tiles_3x3(image: torch.Tensor) -> list[torch.Tensor]:
    """Split a (1, 3, H, W) image into a 3x3 grid (last row/column take the remainder), each upscaled to (H, W).

    Tiles are returned row-major; upscaling is bilinear without antialias (as the reference's tensor resize).
    """
    _, _, height, width = image.shape
    rows = [0, height // 3, 2 * (height // 3), height]
    cols = [0, width // 3, 2 * (width // 3), width]
    return [
        resize_image(image[..., rows[i] : rows[i + 1], cols[j] : cols[j + 1]], (height, width), antialias=False)
        for i in range(3)
        for j in range(3)
    ]


def tiled_density(density_fn: DensityFn, image: torch.Tensor, window: int = 384, stride: int = 128) -> torch.Tensor:
    """(3H, 3W) map: the sliding-window densities of the nine upscaled tiles placed in their 3x3 grid."""
    maps = [sliding_window(density_fn, tile, window, stride) for tile in tiles_3x3(image)]
    return torch.cat([torch.cat(maps[3 * i : 3 * i + 3], dim=1) for i in range(3)], dim=0)


def exemplar_normalised_count(
    density: torch.Tensor,
    rects: torch.Tensor,
    scale: int = 1,
    threshold: float = 1.8,
    density_scaling: float = DENSITY_SCALING,
) -> float:
    """Count = density.sum() / density_scaling, divided by the mean exemplar mass if that exceeds ``threshold``.

    ``rects`` (k, 4) integer [y1, x1, y2, x2] (inclusive); the mass of exemplar i is the density in rows
    scale*y1..scale*y2 and columns scale*x1..scale*x2 (inclusive) / density_scaling (scale = 3 for the 3x3-tiled map).
    """
    count = float(density.sum()) / density_scaling
    rects = torch.as_tensor(rects).long().reshape(-1, 4)
    if len(rects) == 0:
        return count
    masses = [
        float(density[scale * y1 : scale * y2 + 1, scale * x1 : scale * x2 + 1].sum()) / density_scaling
        for y1, x1, y2, x2 in rects.tolist()
    ]
    mean_mass = sum(masses) / len(masses)
    return count / mean_mass if mean_mass > threshold else count


def needs_tiling(rects: torch.Tensor, min_side: int = 10) -> bool:
    """True if any exemplar rect [y1, x1, y2, x2] is smaller than ``min_side`` in both height and width."""
    rects = torch.as_tensor(rects).long().reshape(-1, 4)
    return bool((((rects[:, 2] - rects[:, 0]) < min_side) & ((rects[:, 3] - rects[:, 1]) < min_side)).any())


PROTOCOLS = ("original", "fixed_images", "tiling_above_50")


@torch.no_grad()
def count_image(
    density_fn: DensityFn,
    image: torch.Tensor,
    rects: torch.Tensor,
    protocol: str = "original",
    window: int = 384,
    stride: int = 128,
    tile_min_side: int = 10,
    norm_threshold: float = 1.8,
    density_scaling: float = DENSITY_SCALING,
) -> tuple[float, torch.Tensor]:
    """Count the objects of a (1, 3, H, W) test image with the reference protocol; returns (count, density map).

    "original": sliding window, 3x3 tiling when an exemplar is under ``tile_min_side`` px in both sides, exemplar
    normalisation. "fixed_images": the image is already window x window, one pass + normalisation.
    "tiling_above_50": as "original", and an untiled image whose count exceeds 50 is re-counted tiled.
    The returned map is (H, W), or (3H, 3W) when tiled.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if protocol in ("original", "tiling_above_50") and needs_tiling(rects, tile_min_side):
        density = tiled_density(density_fn, image, window, stride)
        return exemplar_normalised_count(density, rects, 3, norm_threshold, density_scaling), density
    density = sliding_window(density_fn, image, window, stride)
    count = exemplar_normalised_count(density, rects, 1, norm_threshold, density_scaling)
    if protocol == "tiling_above_50" and count > 50:
        density = tiled_density(density_fn, image, window, stride)
        count = exemplar_normalised_count(density, rects, 3, norm_threshold, density_scaling)
    return count, density
