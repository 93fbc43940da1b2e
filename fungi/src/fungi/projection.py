"""Seeded random +-1 projection (Achlioptas) of flattened per-sample gradients to the embedding size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PROJECTION_CHUNK = 1 << 16  # columns converted from int8 to the compute dtype at a time


def random_projection(out_dim: int, in_dim: int, seed: int) -> torch.Tensor:
    """(out_dim, in_dim) float tensor of +-1: ``torch.manual_seed(seed)``, ``torch.rand(out_dim, in_dim) > 0.5``.

    This is the reference construction, so projections released with seed 42 are reproduced exactly. The global torch
    RNG state is restored afterwards so that callers' randomness is unaffected.
    """
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        mask = torch.rand(out_dim, in_dim) > 0.5
    finally:
        torch.set_rng_state(state)
    return mask.float() * 2.0 - 1.0


def project(grads: torch.Tensor, projection: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """s * flatten_rowmajor(grads) @ P^T: grads (B, O, I+1) or (B, D), P (E, D) (+-1, any dtype) -> (B, E) float32.

    ``scale`` defaults to 1 / sqrt(E) (experiment repo). P may be stored as int8; it is converted chunk by chunk so a
    dense float copy of the whole matrix never exists.
    """
    flat = grads.reshape(grads.shape[0], -1).float()
    if flat.shape[1] != projection.shape[1]:
        raise ValueError(f"gradient has {flat.shape[1]} entries but the projection expects {projection.shape[1]}")
    scale = 1.0 / math.sqrt(projection.shape[0]) if scale is None else scale
    out = flat.new_zeros(flat.shape[0], projection.shape[0])
    for start in range(0, flat.shape[1], PROJECTION_CHUNK):
        block = projection[:, start : start + PROJECTION_CHUNK].to(device=flat.device, dtype=flat.dtype)
        out += flat[:, start : start + PROJECTION_CHUNK] @ block.T
    return out * scale


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation (B, D) -> (B, D)."""
    return F.normalize(x.float(), dim=-1)
