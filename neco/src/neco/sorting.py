"""Differentiable sorting networks (Petersen et al., ICML 2021 / ICLR 2022) with the Cauchy relaxation.

A sorting network is a fixed sequence of layers of disjoint comparators. Relaxing each comparator
(min, max) -> (a*x_a + (1-a)*x_b, (1-a)*x_a + a*x_b) with a = atan(beta*(x_b - x_a))/pi + 1/2 makes the
whole network differentiable; tracking the same convex combinations on an identity matrix yields a
doubly-stochastic "soft permutation" P with ``sorted = x @ P`` (row vector times matrix), where P[i, j] is
the weight with which input i lands at rank j (ascending).

Everything is vectorised over rows and over the comparators of a layer: one layer is a handful of
gather/index_add kernels, so the 21 bitonic layers for n = 49 cost 21 small kernel groups per call.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

NETWORKS = ("bitonic", "odd_even")


def _bitonic_layers_diffsort(n: int) -> list[tuple[list[int], list[int]]]:
    """Bitonic network on 2^k >= n wires laid out as in diffsort 0.2 (the reference NeCo uses).

    The lowest 2^k - n wires are virtual: a comparator touching one of them is dropped and the remaining
    wires are renumbered 0..n-1. Returns (min_wires, max_wires) per layer. For some n (22, 38, 42-46, 54, ...)
    this pruning does not give a sorting network; ``_bitonic_layers`` checks and falls back.
    """
    k = max(1, math.ceil(math.log2(n)))
    size = 2**k
    pad = size - n
    layers = []
    for block in range(k):
        for layer in range(block + 1):
            m = 2 ** (block - layer)
            lo, hi = [], []
            for start in range(0, size, 2 * m):
                for j in range(m):
                    a, b = start + j, start + j + m
                    if a < pad or b < pad:
                        continue
                    if (a // 2 ** (block + 1)) % 2 == 1:  # descending half of the bitonic merge
                        a, b = b, a
                    lo.append(a - pad)
                    hi.append(b - pad)
            if lo:
                layers.append((lo, hi))
    return layers


def _bitonic_layers_padded(n: int) -> list[tuple[list[int], list[int]]]:
    """Bitonic network in its all-ascending form (first merge layer compares mirrored wires) on 2^k wires.

    Padding wires n..2^k-1 hold +inf; every comparator puts its max on the higher wire, so they never move and
    comparators touching them are dropped: a valid sorting network for every n.
    """
    k = max(1, math.ceil(math.log2(n)))
    size = 2**k
    layers = []
    for block in range(k):
        span = 2 ** (block + 1)
        pairs = [(s + j, s + span - 1 - j) for s in range(0, size, span) for j in range(span // 2)]
        layers.append(pairs)
        m = span // 4
        while m >= 1:
            layers.append([(s + j, s + j + m) for s in range(0, size, 2 * m) for j in range(m)])
            m //= 2
    out = []
    for pairs in layers:
        kept = [(a, b) for a, b in pairs if b < n]
        if kept:
            out.append(([a for a, _ in kept], [b for _, b in kept]))
    return out


def _sorts_correctly(layers: list[tuple[list[int], list[int]]], n: int, trials: int = 4096) -> bool:
    """Hard-comparator check on random permutations and random 0-1 vectors (0-1 principle, sampled)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.rand(trials, n, generator=gen).argsort(1).double(),
            (torch.rand(trials, n, generator=gen) < torch.rand(trials, 1, generator=gen)).double(),
        ]
    )
    for lo, hi in layers:
        a, b = x[:, lo], x[:, hi]
        x[:, lo], x[:, hi] = torch.minimum(a, b), torch.maximum(a, b)
    return bool((x[:, 1:] >= x[:, :-1]).all())


def _bitonic_layers(n: int) -> list[tuple[list[int], list[int]]]:
    """diffsort's layout where it sorts (n = 49 and all powers of two), the padded form elsewhere."""
    layers = _bitonic_layers_diffsort(n)
    return layers if _sorts_correctly(layers, n) else _bitonic_layers_padded(n)


def _odd_even_layers(n: int) -> list[tuple[list[int], list[int]]]:
    """Odd-even transposition network: n layers alternating comparators (0,1),(2,3),... and (1,2),(3,4),..."""
    layers = []
    for layer in range(n):
        start = layer % 2
        lo = list(range(start, n - 1, 2))
        if lo:
            layers.append((lo, [i + 1 for i in lo]))
    return layers


@lru_cache(maxsize=32)
def network_layers(network: str, n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Comparator layers of ``network`` on ``n`` wires: a tuple of (min_wires, max_wires) index tuples."""
    if network == "bitonic":
        layers = _bitonic_layers(n)
    elif network == "odd_even":
        layers = _odd_even_layers(n)
    else:
        raise ValueError(f"unknown sorting network {network!r}; expected one of {NETWORKS}")
    return tuple((tuple(lo), tuple(hi)) for lo, hi in layers)


@lru_cache(maxsize=64)
def _layer_plan(network: str, n: int, device: str = "cpu") -> tuple[list[tuple[torch.Tensor, int]], torch.Tensor]:
    """Per layer: a gather index that puts the layer's min wires first, then its max wires, then the rest
    (relative to the previous layer's arrangement), and the comparator count k; plus the final index that
    restores wire order. Rearranging whole wires keeps every update a contiguous slice operation. Cached per
    device so that no index is copied to an accelerator per call."""
    position = list(range(n))  # position[w]: where wire w currently sits
    plan = []
    for lo, hi in network_layers(network, n):
        touched = set(lo) | set(hi)
        arrangement = list(lo) + list(hi) + [w for w in range(n) if w not in touched]
        plan.append((torch.tensor([position[w] for w in arrangement], device=device), len(lo)))
        position = [0] * n
        for pos, w in enumerate(arrangement):
            position[w] = pos
    return plan, torch.tensor(position, device=device)


def cauchy_relaxation(diff: torch.Tensor, steepness: float) -> torch.Tensor:
    """Probability that the first element of a pair is the smaller: atan(beta * (x_b - x_a)) / pi + 1/2."""
    return torch.atan(steepness * diff) / math.pi + 0.5


def soft_sort(x: torch.Tensor, network: str = "bitonic", steepness: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed ascending sort of each row of ``x`` (M, n).

    Returns ``(sorted_values (M, n), perm (M, n, n))`` with ``sorted_values[m] = x[m] @ perm[m]`` and
    ``perm[m, i, j]`` the weight of input i at rank j. ``perm`` is doubly stochastic and tends to the hard
    permutation matrix as ``steepness`` grows. Works in any floating dtype; gradients flow to ``x``.
    """
    if x.dim() != 2:
        raise ValueError(f"soft_sort expects x of shape (M, n), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"soft_sort expects a floating tensor, got {x.dtype}")
    m, n = x.shape
    if n < 2:
        return x, torch.ones(m, n, n, dtype=x.dtype, device=x.device)
    plan, final = _layer_plan(network, n, str(x.device))
    # wire-major state: values (wires, M) and weights (wires, M, inputs)
    values = x.t()
    weights = torch.eye(n, dtype=x.dtype, device=x.device).unsqueeze(1).expand(n, m, n)
    for index, k in plan:
        values, weights = values.index_select(0, index), weights.index_select(0, index)
        a, b, rest = values[:k], values[k : 2 * k], values[2 * k :]
        # (1 - alpha) is the weight that crosses between the two wires of a comparator
        gap = b - a
        swap = 1.0 - cauchy_relaxation(gap, steepness)
        shift = swap * gap
        values = torch.cat([a + shift, b - shift, rest])
        wa, wb, wrest = weights[:k], weights[k : 2 * k], weights[2 * k :]
        cross = swap.unsqueeze(-1) * (wb - wa)
        weights = torch.cat([wa + cross, wb - cross, wrest])
    return values.index_select(0, final).t(), weights.index_select(0, final).permute(1, 2, 0)
