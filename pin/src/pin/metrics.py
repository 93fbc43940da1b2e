"""Localisation metrics: per-object IoU, mIoU with COCO-style size bins and against the grid-snapped ground truth,
the reference's batch weighting, P@t."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .boxes import GridCodec

BINS = ("s", "m", "l")


def _as_boxes(boxes) -> torch.Tensor:
    """(N, 4) float64 CPU tensor from a tensor on any device, an array or nested lists (results go to numpy)."""
    t = boxes.detach().cpu() if torch.is_tensor(boxes) else torch.as_tensor(np.asarray(boxes, dtype=np.float64))
    return t.to(torch.float64).reshape(-1, 4)


def paired_iou(pred_boxes, gt_boxes) -> torch.Tensor:
    """IoU of each prediction with its own ground truth, (N,4) x (N,4) xyxy -> (N,), continuous area (no +1)."""
    p, g = _as_boxes(pred_boxes), _as_boxes(gt_boxes)
    if p.shape != g.shape:
        raise ValueError(f"pred_boxes {tuple(p.shape)} and gt_boxes {tuple(g.shape)} must both be (N, 4)")
    lt = torch.maximum(p[:, :2], g[:, :2])
    rb = torch.minimum(p[:, 2:], g[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    union = area_p + area_g - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def size_bins(gt_boxes, image_size: int = 224) -> np.ndarray:
    """Bin letter per ground truth from its area a: s if a < (32s)^2, m if < (96s)^2, else l; s = image_size/224."""
    g = _as_boxes(gt_boxes)
    area = ((g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])).numpy()
    scale = image_size / 224
    small, large = (32 * scale) ** 2, (96 * scale) ** 2
    return np.where(area < small, "s", np.where(area < large, "m", "l"))


def localisation_miou(pred_boxes, gt_boxes, image_size: int = 224, codec: GridCodec | None = None) -> dict:
    """Pooled per-object mIoU and its small/medium/large bins (bin value None when the bin is empty).

    pred_boxes, gt_boxes: (N, 4) xyxy pixel boxes (tensor, array or nested lists), paired row by row.
    Returns {"miou", "miou_s", "miou_m", "miou_l", "num", "num_s", "num_m", "num_l"}; with a `codec` also
    "miou_grid": the reference's IoU_grid, the mIoU against each ground truth snapped by `codec.snap`.
    """
    ious = paired_iou(pred_boxes, gt_boxes).numpy()
    bins = size_bins(gt_boxes, image_size)
    out: dict = {"miou": float(ious.mean()) if len(ious) else None, "num": int(len(ious))}
    for b in BINS:
        sel = ious[bins == b]
        out[f"miou_{b}"] = float(sel.mean()) if len(sel) else None
        out[f"num_{b}"] = int(len(sel))
    if codec is not None:
        snapped = [codec.snap(box) for box in _as_boxes(gt_boxes).tolist()]
        out["miou_grid"] = float(paired_iou(pred_boxes, snapped).mean()) if len(ious) else None
    return out


def batch_weighted_miou(batches: Sequence[tuple], image_size: int = 224, codec: GridCodec | None = None) -> dict:
    """The reference's logged figure: per-batch means averaged over batches weighted by the batch's object count.

    Each bin's per-batch mean enters only for batches where the bin is non-empty, still weighted by the batch's
    total object count (Lightning's epoch mean of a value logged with batch_size = objects in the batch).
    `batches`: sequence of (pred_boxes, gt_boxes) per evaluation batch; with a `codec` also "miou_grid".
    """
    keys = ("miou", "miou_s", "miou_m", "miou_l") + (("miou_grid",) if codec is not None else ())
    sums = dict.fromkeys(keys, 0.0)
    weights = dict.fromkeys(sums, 0)
    for pred, gt in batches:
        stats = localisation_miou(pred, gt, image_size, codec)
        n = stats["num"]
        for key in sums:
            if stats[key] is not None:
                sums[key] += stats[key] * n
                weights[key] += n
    return {k: (sums[k] / weights[k] if weights[k] else None) for k in sums}


def precision_at(pred_boxes, gt_boxes, threshold: float = 0.3) -> float:
    """Percentage of pairs with IoU >= threshold (RefCOCO P@0.3)."""
    ious = paired_iou(pred_boxes, gt_boxes)
    return float((ious >= threshold).double().mean() * 100) if len(ious) else 0.0
