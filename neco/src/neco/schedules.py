"""Per-step cosine schedules (spec section 5): learning rate, weight decay and teacher momentum."""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int) -> np.ndarray:
    """Values ``final + 0.5 * (base - final) * (1 + cos(pi * t / T))`` for t = 0..T-1, T = epochs * iters_per_epoch."""
    total = int(epochs) * int(iters_per_epoch)
    if total <= 0:
        raise ValueError(f"cosine_schedule needs epochs * iters_per_epoch > 0, got {epochs} * {iters_per_epoch}")
    t = np.arange(total, dtype=np.float64)
    return final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * t / total))
