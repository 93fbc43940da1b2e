"""The position-embedding interpolation of the official DINO and DINOv2 ViTs, for timm ``VisionTransformer`` models.

At an input grid other than the stored one, timm resamples the position table by antialiased bicubic interpolation to
the target size. The DINO and DINOv2 reference code calls bicubic interpolation *without* antialias on the scale
factor ``(grid + 0.1) / M`` (M the stored grid side; the "+0.1" offset of DINO issue #8), which samples other source
positions. Released DINO / DINOv2 / DoRA / NeCo checkpoints run at another resolution than they were stored at
(local crops, DINOv2 at 224 px, DAVIS frames) therefore give other features under timm's default.
``use_dino_interpolation(model)`` makes a timm ViT interpolate as the reference does. Needs timm.

The port sees the token grid only: for inputs whose sides are not multiples of the patch size and give the stored grid
(e.g. 64 x 70 px, patch 8, an 8 x 8 table), the reference still resamples the table by (8 + 0.1) / 8; here it is used
as it is. Every caller in this repository feeds multiples of the patch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


def dino_interpolate(
    patch_pos: torch.Tensor, grid: tuple[int, int], offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """(1, M*M, D) patch position table -> (1, h*w, D) for an (h, w) token grid, as the DINO/DINOv2 code does:
    unchanged when (h, w) == (M, M), else bicubic on scale factors ((h + offset) / M, (w + offset) / M)
    (``offset=0``: to the size (h, w)), computed in float32 and returned in the table's dtype."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position table of {n} patch entries is not a square grid")
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (side, side):
        return patch_pos
    table = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        sizing = {"scale_factor": ((h + offset) / side, (w + offset) / side)}
    else:
        sizing = {"size": (h, w)}
    table = F.interpolate(table, mode="bicubic", antialias=antialias, align_corners=False, **sizing)
    if table.shape[-2:] != (h, w):
        raise ValueError(f"offset {offset} gives a {tuple(table.shape[-2:])} grid, not {(h, w)}")
    return table.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


class DinoInterpolationViT(VisionTransformer):
    """A timm ``VisionTransformer`` whose position table is interpolated by ``dino_interpolate``; made by
    ``use_dino_interpolation`` from a built model (not constructed directly)."""

    dino_interpolation = (0.1, False)  # (offset, antialias)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size:
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pos = self.pos_embed
        pos = torch.cat([pos[:, :prefix], dino_interpolate(pos[:, prefix:], (h, w), *self.dino_interpolation)], 1)
        x = x.reshape(b, h * w, c)
        tokens = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:  # registers / DINOv2-reg layout: the table covers the patches only
            x = torch.cat([*tokens, x + pos], 1)
        else:
            x = torch.cat([*tokens, x], 1) + pos
        return self.pos_drop(x)


def supports_dino_interpolation(model: torch.nn.Module) -> bool:
    """Whether ``use_dino_interpolation`` applies to ``model``: a plain timm ``VisionTransformer`` (not a subclass
    with its own token layout, e.g. DeiT's distillation token) built with ``dynamic_img_size=True``, whose position
    table covers a square grid (the DINO / DINOv2 code interpolates an M x M table)."""
    if type(model) not in (VisionTransformer, DinoInterpolationViT) or model.pos_embed is None:
        return False
    grid = tuple(model.patch_embed.grid_size)
    return bool(getattr(model, "dynamic_img_size", False)) and grid[0] == grid[1]


def use_dino_interpolation(model: torch.nn.Module, offset: float = 0.1, antialias: bool = False) -> torch.nn.Module:
    """Make a timm ``VisionTransformer`` built with ``dynamic_img_size=True`` interpolate its position table like the
    official DINO (``offset=0.1``) and DINOv2 (``offset=0.1, antialias=False``, its defaults) code; returns the model.

    Only the model's class changes, to ``DinoInterpolationViT``; the weights are untouched, and ``copy.deepcopy``
    (EMA teachers), DDP and pickling keep the behaviour.
    """
    if type(model) not in (VisionTransformer, DinoInterpolationViT):
        raise ValueError(f"use_dino_interpolation needs a timm VisionTransformer, got {type(model).__name__}")
    if not getattr(model, "dynamic_img_size", False) or model.pos_embed is None:
        raise ValueError("use_dino_interpolation needs a ViT built with dynamic_img_size=True and a position table")
    if model.patch_embed.grid_size[0] != model.patch_embed.grid_size[1]:
        raise ValueError(
            f"use_dino_interpolation needs a square position grid, got {tuple(model.patch_embed.grid_size)} "
            "(img_size of unequal sides)"
        )
    model.__class__ = DinoInterpolationViT
    model.dino_interpolation = (float(offset), bool(antialias))
    return model
