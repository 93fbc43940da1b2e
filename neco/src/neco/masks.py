"""Foreground / background loss masks from CLS attention (the reference's ``loss_mask`` ablation, spec section 4).

The teacher's last-block attention of the CLS token to the patches, averaged over heads, is blurred (Gaussian,
7 x 7, sigma 0.6), the locations holding the largest 60 % of its mass are kept and 8-connected specks of one or two
locations are dropped: the foreground. ``bg`` is its complement on the token grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

LOSS_MASKS = ("all", "fg", "bg")
MASS = 0.6  # share of the blurred attention mass kept as foreground (the reference's threshold=0.6)
BLUR_KERNEL, BLUR_SIGMA = 7, 0.6


def check_loss_mask(mode: str) -> str:
    """``mode`` if it is a known ``loss.mask`` value, else ValueError listing them."""
    if mode not in LOSS_MASKS:
        raise ValueError(f"loss.mask={mode!r}: expected one of {', '.join(LOSS_MASKS)}")
    return mode


def keep_mass(values: torch.Tensor, share: float = MASS) -> torch.Tensor:
    """Bool (B, N): per row, sort ascending and keep the entries whose running share of the row's sum exceeds
    1 - share, i.e. the largest entries holding (at least) ``share`` of the mass."""
    ascending, order = values.sort(dim=-1, stable=True)
    keep = (ascending / ascending.sum(-1, keepdim=True)).cumsum(-1) > 1 - share
    return torch.empty_like(keep).scatter_(-1, order, keep)


def drop_specks(mask: torch.Tensor) -> torch.Tensor:
    """Bool (B, S, S) without its 8-connected components of one or two pixels.

    A pixel is in such a component iff it has no neighbour, or exactly one neighbour that itself has exactly one.
    """
    ring = torch.ones(1, 1, 3, 3, device=mask.device)
    ring[..., 1, 1] = 0
    on = mask[:, None].float()
    degree = F.conv2d(on, ring, padding=1) * on  # set neighbours of each set pixel
    neighbour_degree = F.conv2d(degree, ring, padding=1)  # for a pixel of degree 1: its neighbour's degree
    speck = (degree == 0) | ((degree == 1) & (neighbour_degree == 1))
    return mask & ~speck[:, 0]


def foreground_mask(attention: torch.Tensor) -> torch.Tensor:
    """Bool (B, N) foreground of a row-major square token grid from CLS attention (B, N)."""
    b, n = attention.shape
    side = math.isqrt(n)
    if side * side != n or side <= BLUR_KERNEL // 2:
        raise ValueError(f"foreground masks need a square grid of at least 4 x 4 tokens, got {n} tokens")
    maps = attention.float().reshape(b, 1, side, side)
    blurred = gaussian_blur(maps, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])  # reflect padding
    keep = keep_mass(blurred.reshape(b, n)).reshape(b, side, side)
    return drop_specks(keep).reshape(b, n)


def token_masks(attentions: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """Float 0/1 (B, N) masks, one per global crop, for ``loss.mask`` ``fg`` (foreground) or ``bg`` (the rest)."""
    if mode not in ("fg", "bg"):
        raise ValueError(f"token masks exist for loss.mask fg or bg, not {mode!r}")
    fg = [foreground_mask(a) for a in attentions]
    return [(m if mode == "fg" else ~m).float() for m in fg]
