"""The pixel-masked density MSE of UnCounTR (CounTR-derived; spec b, "Loss")."""

from __future__ import annotations

import torch


def density_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    keep_prob: float = 0.8,
    keep_mask: torch.Tensor | None = None,
    standard_size: int | None = 224,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masked squared error between predicted and target densities, both (B, H, W).

    Keep-mask M: ``keep_mask`` ((B, H, W) bool) if given, else Bernoulli(``keep_prob``) per pixel and image (drawn
    with ``generator``), OR-ed with ``target > 0`` so target blobs always count.
    loss = mean_b sum_{x,y} M * (pred - target)^2 / standard_size^2. With ``standard_size=None`` the actual H * W
    replaces standard_size^2, i.e. the mean over all pixels of M * (pred - target)^2 (the plain MSE when keep_prob
    is 1 and no mask is given).
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"pred and target must both be (B, H, W); got {tuple(pred.shape)} and {tuple(target.shape)}")
    if keep_mask is None:
        if keep_prob >= 1.0:
            keep = torch.ones_like(target, dtype=torch.bool)
        else:
            draws = torch.rand(target.shape, generator=generator, device="cpu").to(target.device)
            keep = draws < keep_prob
    else:
        if keep_mask.shape != target.shape:
            raise ValueError(f"keep_mask must be {tuple(target.shape)}, got {tuple(keep_mask.shape)}")
        keep = keep_mask.to(device=target.device, dtype=torch.bool)
    keep = keep | (target > 0)
    squared = (pred.float() - target.float()) ** 2 * keep
    if standard_size is None:
        return squared.mean()
    return (squared.sum(dim=(1, 2)) / float(standard_size) ** 2).mean()
