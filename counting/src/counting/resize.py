"""Tensor resizes that do not depend on the torchvision version.

The reference ran torchvision 0.14, whose tensor ``Resize`` did *not* antialias (``antialias=None`` meant off for
tensors); torchvision >= 0.17 antialiases by default, which silently changes object downscaling and exemplar crops.
Every resize here calls ``torch.nn.functional.interpolate`` with an explicit ``antialias`` flag:

- ``antialias=False`` (bilinear) matches the paper for tensor resizes: object images, object cut-outs, exemplar crops,
  3x3 tiles, backgrounds given as tensors.
- ``antialias=True`` (bilinear) matches PIL's bilinear resize, which the reference used for the FSC-147 test images
  (PIL always antialiases when downscaling).
- masks use ``nearest`` (as the reference: torchvision ``InterpolationMode.NEAREST``, i.e. floor indexing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_image(image: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) or (B, C, H, W) float tensor to ``size`` = (height, width)."""
    squeeze = image.dim() == 3
    x = image[None] if squeeze else image
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)
    return x[0] if squeeze else x


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (H, W) boolean mask to ``size`` = (height, width)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.bool()
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0] > 0.5


def shorter_side_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (height, width) of a shorter-side resize to ``size`` with the longer side capped at ``max_size``.

    Same rule as torchvision's ``Resize(size, max_size=...)`` for an int size: the shorter side becomes ``size``, the
    longer ``int(size * long / short)``; if that exceeds ``max_size`` the longer side becomes ``max_size`` and the
    shorter ``int(max_size * size / long_new)``. Sides are at least 1 pixel.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_short, new_long = max(new_short, 1), max(new_long, 1)
    return (new_long, new_short) if width <= height else (new_short, new_long)
