"""Sinkhorn-Knopp assignment of patches to object prototypes (DoRA tracking, spec section b.5)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, epsilon: float = 0.05, num_iters: int = 30) -> torch.Tensor:
    """Entropic-OT assignment of N patches to K prototypes, per batch item.

    logits: (B, N, K) similarities. Returns (B, N, K): each patch's K weights sum to 1 and each prototype's
    column sums to about N/K. Same normalisation sequence as the reference (exp((S - max S)/eps), total to 1,
    then ``num_iters`` times prototypes-to-1/K and patches-to-1/N, finally times N), but carried out in the log
    domain in float64: where the reference float32 exponent does not underflow the results agree; where it does
    (the reference returns NaN for the whole sample) this stays finite.
    """
    if logits.ndim != 3:
        raise ValueError(f"sinkhorn_knopp expects logits of shape (B, N, K), got {tuple(logits.shape)}")
    dtype = logits.dtype
    _, n, k = logits.shape
    s = torch.nan_to_num(logits.double(), nan=0.0, posinf=1e30, neginf=-1e30)
    log_q = (s - s.amax(dim=(1, 2), keepdim=True)) / epsilon
    log_q = log_q - torch.logsumexp(log_q, dim=(1, 2), keepdim=True)
    log_k, log_n = math.log(k), math.log(n)
    for _ in range(num_iters):
        # each prototype (column over N) to total 1/K, then each patch (row over K) to total 1/N
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_k
        log_q = log_q - torch.logsumexp(log_q, dim=2, keepdim=True) - log_n
    return torch.exp(log_q + log_n).to(dtype)
