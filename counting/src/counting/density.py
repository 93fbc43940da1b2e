"""Density-map targets: one Gaussian blob of mass ``DENSITY_SCALING`` per object centre (spec b.7).

The blur follows torchvision's ``gaussian_blur`` semantics (normalised separable kernel sampled at integer offsets,
reflect padding), re-implemented so that it does not depend on the torchvision version.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from counting import DENSITY_SCALING


def kernel_size_and_sigma(mean_extent: float) -> tuple[int, float]:
    """Kernel size and sigma along one axis from the mean box extent (width for x, height for y), in pixels.

    k = int(mean extent), +1 if even; sigma = (k - 1) / 8; final size = 2 * round(4 * sigma) + 1 (which equals k).
    """
    k = int(mean_extent)
    if k % 2 == 0:
        k += 1
    sigma = (k - 1) / 8.0
    return 2 * round(4 * sigma) + 1, sigma


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``kernel_size`` taps (torchvision's sampling); a delta when sigma is 0."""
    if sigma <= 0 or kernel_size <= 1:
        return torch.ones(1)
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).float()


def gaussian_blur(image: torch.Tensor, kernel_size: tuple[int, int], sigma: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur of a (H, W) map with reflect padding; ``kernel_size``/``sigma`` are (x, y).

    Reflect padding needs pad < side, so a kernel wider than the map is cut to the widest allowed (2 * side - 1);
    that never happens at the paper's sizes (objects are at most ~90 px on 224 px collages).
    """
    out = image[None, None].float()
    height, width = image.shape
    for axis, (size, s, side) in enumerate(zip(kernel_size, sigma, (width, height))):
        size = min(size, 2 * side - 1)
        kernel = gaussian_kernel1d(size, s).to(out.device)
        if kernel.numel() == 1:
            continue
        pad = kernel.numel() // 2
        if axis == 0:  # along x (columns)
            out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        else:
            out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[0, 0]


def point_map(boxes: torch.Tensor, height: int, width: int, scale: float = DENSITY_SCALING) -> torch.Tensor:
    """(H, W) map with ``scale`` *assigned* at (row int(cy), col int(cx)) of every xyxy box; duplicates count once.

    The map is on the device of ``boxes`` (CPU for lists and arrays)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    points = torch.zeros(height, width, device=boxes.device)
    if len(boxes):
        cx = ((boxes[:, 0] + boxes[:, 2]) / 2).long().clamp(0, width - 1)
        cy = ((boxes[:, 1] + boxes[:, 3]) / 2).long().clamp(0, height - 1)
        points[cy, cx] = scale
    return points


def density_from_boxes(boxes: torch.Tensor, height: int, width: int, scale: float = DENSITY_SCALING) -> torch.Tensor:
    """Density map (H, W) of the objects in ``boxes`` ((n, 4) float xyxy pixels).

    ``scale`` is written at each box centre (assignment), then blurred once with the separable Gaussian whose x size
    and sigma come from the mean box width and y size/sigma from the mean box height (``kernel_size_and_sigma``),
    reflect padding. Its sum / scale equals the number of distinct centre pixels up to border losses.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    points = point_map(boxes, height, width, scale)
    if len(boxes) == 0:
        return points
    kx, sx = kernel_size_and_sigma(float((boxes[:, 2] - boxes[:, 0]).mean()))
    ky, sy = kernel_size_and_sigma(float((boxes[:, 3] - boxes[:, 1]).mean()))
    return gaussian_blur(points, (kx, ky), (sx, sy))


def dot_density_map(
    points: torch.Tensor | np.ndarray,
    height: int,
    width: int,
    scale_xy: tuple[float, float] = (1.0, 1.0),
    scale: float = DENSITY_SCALING,
    sigma: float = 1.0,
) -> torch.Tensor:
    """Ground-truth density (H, W) of annotated dots, as the reference's FSC-147 test set draws it for figures.

    Each (x, y) point, multiplied by ``scale_xy`` (resized / original size), sets pixel (int(y), int(x)) (clamped
    to the map) to 1 -- two dots on one pixel count once --; the map is blurred with scipy's Gaussian of ``sigma``
    (reflect mode, which keeps the mass at the borders) and multiplied by ``scale``.
    """
    from scipy.ndimage import gaussian_filter

    dots = np.zeros((height, width), np.float32)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points):
        cols = np.clip((points[:, 0] * scale_xy[0]).astype(np.int64), 0, width - 1)
        rows = np.clip((points[:, 1] * scale_xy[1]).astype(np.int64), 0, height - 1)
        dots[rows, cols] = 1.0
    return torch.from_numpy(gaussian_filter(dots, sigma=sigma, mode="reflect") * scale)
