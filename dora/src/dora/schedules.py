"""DINO schedules: warmup + cosine (lr, weight decay, teacher momentum); linear-then-constant teacher temperature."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-iteration values, shape (epochs * niter_per_ep,).

    A linear warmup from ``start_warmup_value`` to ``base`` (endpoints included) over ``warmup_epochs`` epochs,
    then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for i = 0 .. n-1 over the remaining n iterations.
    """
    warmup_iters = int(warmup_epochs * niter_per_ep)
    total = int(epochs * niter_per_ep)
    if warmup_iters > total:
        raise ValueError(f"warmup_epochs={warmup_epochs} exceeds epochs={epochs}")
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine)).astype(np.float64)


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature, shape (nepochs,): linspace(warmup_temp, temp, warmup_epochs), then constant."""
    if warmup_epochs > nepochs:
        raise ValueError(f"warmup_teacher_temp_epochs={warmup_epochs} exceeds nepochs={nepochs}")
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.full(nepochs - warmup_epochs, temp)))
