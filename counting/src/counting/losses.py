"""The pixel-masked density MSE of UnCounTR (CounTR-derived; spec b, "Loss")."""

from __future__ import annotations

import torch

from counting import DENSITY_SCALING


def density_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    keep_prob: float = 0.8,
    keep_mask: torch.Tensor | None = None,
    standard_size: int | None = 224,
    generator: torch.Generator | None = None,
    *,
    shared_mask: bool = False,
    target_all: torch.Tensor | None = None,
    keep_all_objects: bool = False,
    distractor_weight: float = 1.0,
    density_scaling: float = DENSITY_SCALING,
) -> torch.Tensor:
    """Masked squared error between predicted and target densities, both (B, H, W).

    Keep-mask M: ``keep_mask`` ((B, H, W) bool) if given, else Bernoulli(``keep_prob``) per pixel and image (drawn
    with ``generator``), OR-ed with ``target > 0`` so target blobs always count.
    loss = mean_b sum_{x,y} M * (pred - target)^2 / standard_size^2. With ``standard_size=None`` the actual H * W
    replaces standard_size^2, i.e. the mean over all pixels of M * (pred - target)^2 (the plain MSE when keep_prob
    is 1 and no mask is given).

    The reference's ablation options, all off by default: ``shared_mask`` draws one (H, W) mask for the whole batch;
    with ``target_all`` (B, H, W), the density of all pasted objects, ``keep_all_objects`` ORs the mask with
    ``target_all > 0`` instead of ``target > 0``, and ``distractor_weight`` multiplies M wherever the non-target
    density (target_all - target) / density_scaling exceeds 1e-3.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"pred and target must both be (B, H, W); got {tuple(pred.shape)} and {tuple(target.shape)}")
    if (keep_all_objects or distractor_weight != 1.0) and target_all is None:
        raise ValueError("keep_all_objects and distractor_weight need target_all, the density map of all objects")
    if target_all is not None and target_all.shape != target.shape:
        raise ValueError(f"target_all must be {tuple(target.shape)}, got {tuple(target_all.shape)}")
    if keep_mask is None:
        if keep_prob >= 1.0:
            keep = torch.ones_like(target, dtype=torch.bool)
        else:
            shape = (1, *target.shape[1:]) if shared_mask else target.shape
            draws = torch.rand(shape, generator=generator, device="cpu").to(target.device)
            keep = (draws < keep_prob).expand_as(target)
    else:
        if keep_mask.shape != target.shape:
            raise ValueError(f"keep_mask must be {tuple(target.shape)}, got {tuple(keep_mask.shape)}")
        keep = keep_mask.to(device=target.device, dtype=torch.bool)
    keep = keep | ((target_all if keep_all_objects else target) > 0)
    weight = keep.float()
    if distractor_weight != 1.0:
        distractor = (target_all.float() - target.float()) / density_scaling > 1e-3
        weight = torch.where(distractor, weight * distractor_weight, weight)
    squared = (pred.float() - target.float()) ** 2 * weight
    if standard_size is None:
        return squared.mean()
    return (squared.sum(dim=(1, 2)) / float(standard_size) ** 2).mean()
