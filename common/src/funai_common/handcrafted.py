"""Hand-crafted patch features: a sanity baseline for the dense evaluators."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from funai_common.transforms import HUMMINGBIRD_REFERENCE_STD, IMAGENET_MEAN


def colour_patch_features(
    images: torch.Tensor, patch_size: int, levels: int = 5, width: float = 0.12, std=HUMMINGBIRD_REFERENCE_STD
) -> torch.Tensor:
    """(B, S*S, levels**3) features: each patch's mean RGB colour encoded by Gaussian bumps on a colour grid.

    images: (B, 3, H, W) normalised with ImageNet mean and ``std``. Distinct colours give near-orthogonal features,
    so patches of one flat colour retrieve patches of the same colour under cosine similarity.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    scale = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    rgb = F.avg_pool2d(images * scale + mean, patch_size).flatten(2).transpose(1, 2)  # (B, S*S, 3) in [0, 1]
    centres = torch.linspace(0, 1, levels, device=images.device)
    bumps = torch.exp(-((rgb[..., None] - centres) ** 2) / (2 * width**2))  # (B, S*S, 3, levels)
    return torch.einsum("bpi,bpj,bpk->bpijk", bumps[:, :, 0], bumps[:, :, 1], bumps[:, :, 2]).flatten(2)
