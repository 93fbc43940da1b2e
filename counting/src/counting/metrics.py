"""Counting metrics: MAE / RMSE overall and on the FSC-147 low / medium / high subsets (by ground-truth count)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SUBSETS = {"low": (0, 17), "medium": (17, 41), "high": (41, math.inf)}
"""Ground-truth count ranges [lo, hi) of the test subsets: low < 17, medium 17..40, high >= 41."""


def _as_array(values: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _mae_rmse(err: np.ndarray) -> dict[str, float]:
    if err.size == 0:
        return {"mae": float("nan"), "rmse": float("nan")}
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean()))}


def count_metrics(pred_counts: Sequence[float], gt_counts: Sequence[float]) -> dict:
    """MAE and RMSE of predicted vs ground-truth counts, overall and per subset.

    Returns {"mae", "rmse", "low": {"mae", "rmse"}, "medium": {...}, "high": {...}}; an empty subset gives NaNs.
    """
    pred, gt = _as_array(pred_counts), _as_array(gt_counts)
    if pred.shape != gt.shape:
        raise ValueError(f"pred_counts and gt_counts differ in length: {pred.size} vs {gt.size}")
    out: dict = _mae_rmse(pred - gt)
    for name, (lo, hi) in SUBSETS.items():
        sel = (gt >= lo) & (gt < hi)
        out[name] = _mae_rmse(pred[sel] - gt[sel])
    return out


def kendall_tau(pred_counts: Sequence[float], gt_counts: Sequence[float]) -> float:
    """Kendall's tau-b between predicted and ground-truth counts (reported by the reference's aggregation script)."""
    from scipy.stats import kendalltau

    pred, gt = _as_array(pred_counts), _as_array(gt_counts)
    if pred.size < 2:
        return float("nan")
    return float(kendalltau(pred, gt).statistic)
