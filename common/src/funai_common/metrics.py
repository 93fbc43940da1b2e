"""Segmentation mIoU with Hungarian, identity or many-to-one matching of predicted ids to ground-truth classes.

Follows open-hummingbird-eval's ``PredsmIoU``: a confusion matrix over pixels whose ground truth is not ignored,
per-class IoU = TP / max(TP + FP + FN, 1e-8), and the mean over all classes (an absent class counts as 0).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

MATCHINGS = ("hungarian", "identity", "many_to_one")


def _flat_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1).astype(np.int64)


class ConfusionMatrix:
    """Streaming confusion matrix: rows are ground-truth classes, columns predicted ids.

    num_predicted: number of predicted ids (clusters) when it differs from num_classes (overclustering).
    """

    def __init__(self, num_classes: int, num_predicted: int | None = None, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.num_predicted = num_predicted or num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, self.num_predicted), dtype=np.int64)

    def update(self, gt, pred) -> None:
        """Add integer maps of equal shape (torch or numpy); ground-truth ids outside [0, num_classes) other than the
        ignore index are an error (a num_classes that does not match the dataset)."""
        gt, pred = _flat_numpy(gt), _flat_numpy(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"gt and pred must have the same number of pixels, got {gt.size} and {pred.size}")
        valid = gt != self.ignore_index if self.ignore_index is not None else np.ones(gt.shape, bool)
        outside = valid & ((gt < 0) | (gt >= self.num_classes))
        if outside.any():  # a num_classes that disagrees with the dataset would otherwise score silently
            raise ValueError(
                f"ground-truth ids {np.unique(gt[outside])[:5].tolist()} outside [0, {self.num_classes}) "
                f"(ignore index {self.ignore_index}): num_classes does not match the masks"
            )
        keep = valid & (pred >= 0) & (pred < self.num_predicted)
        codes = gt[keep] * self.num_predicted + pred[keep]
        self.matrix += np.bincount(codes, minlength=self.matrix.size).reshape(self.matrix.shape)

    def assignment(self, matching: str = "hungarian") -> np.ndarray:
        """Ground-truth class assigned to each predicted id, shape (num_predicted,)."""
        if matching not in MATCHINGS:
            raise ValueError(f"unknown matching {matching!r}; expected one of {MATCHINGS}")
        if matching == "identity":
            if self.num_predicted != self.num_classes:
                raise ValueError("identity matching needs as many predicted ids as classes")
            return np.arange(self.num_classes)
        tp = self.matrix.T.astype(np.float64)  # (pred, gt)
        if matching == "many_to_one":
            # Each predicted id goes to the class it overlaps most (its highest-precision class).
            return tp.argmax(1)
        iou = tp / np.maximum(tp.sum(1, keepdims=True) + tp.sum(0, keepdims=True) - tp, 1e-8)
        rows, cols = linear_sum_assignment(1.0 - iou)
        mapping = np.zeros(self.num_predicted, dtype=np.int64)  # unmatched predicted ids -> class 0
        mapping[rows] = cols
        return mapping

    def counts(self, matching: str = "hungarian") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class pixel counts (TP, FP, FN), each (num_classes,) int64, after matching predicted ids to classes
        (the reference's ``PredsmIoU.compute`` returns them next to the IoU)."""
        mapping = self.assignment(matching)
        matched = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        for pred_id, cls in enumerate(mapping):
            matched[:, cls] += self.matrix[:, pred_id]
        tp = np.diag(matched).copy()
        return tp, matched.sum(0) - tp, matched.sum(1) - tp

    def miou(self, matching: str = "hungarian") -> tuple[float, np.ndarray]:
        """(mean IoU over all classes, per-class IoU (num_classes,)) after matching predicted ids to classes."""
        tp, fp, fn = (c.astype(np.float64) for c in self.counts(matching))
        iou = tp / np.maximum(tp + fp + fn, 1e-8)
        return float(iou.mean()), iou


def miou(
    gt,
    pred,
    num_classes: int,
    ignore_index: int | None = 255,
    matching: str = "hungarian",
    num_predicted: int | None = None,
) -> tuple[float, np.ndarray]:
    """mIoU in [0, 1] and per-class IoU of integer maps ``gt`` and ``pred`` of any equal shape (torch or numpy).

    matching: "hungarian" (one-to-one, maximal total IoU; reference default), "identity" or "many_to_one".
    Predicted ids outside [0, num_predicted) (default num_classes) and ignored ground truth are left out.
    """
    cm = ConfusionMatrix(num_classes, num_predicted, ignore_index)
    cm.update(gt, pred)
    return cm.miou(matching)
