"""Linear probing on frozen features with scikit-learn's logistic regression."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fit(features, labels, C: float, max_iter: int, seed: int) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(features, labels)


def _topk(probabilities: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    ranking = classes[np.argsort(-probabilities, axis=1, kind="stable")]
    hits = ranking == labels[:, None]
    return {"top1": 100.0 * hits[:, 0].mean(), "top5": 100.0 * hits[:, :5].any(1).mean()}


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    C: float | None = None,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of a logistic regression on standardised features.

    ``C=None`` picks the inverse regularisation from a small grid on a stratified 10 % of the training split, then
    refits on all of it; the chosen value is returned as "C".
    """
    x_train, y_train = _numpy(train_features).astype(np.float64), _numpy(train_labels).astype(np.int64)
    x_test, y_test = _numpy(test_features).astype(np.float64), _numpy(test_labels).astype(np.int64)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    if C is None:
        stratify = y_train if np.bincount(y_train).min() >= 2 else None
        x_fit, x_val, y_fit, y_val = train_test_split(
            x_train, y_train, test_size=0.1, random_state=seed, stratify=stratify
        )
        scores = [_fit(x_fit, y_fit, c, max_iter, seed).score(x_val, y_val) for c in DEFAULT_C_GRID]
        C = DEFAULT_C_GRID[int(np.argmax(scores))]
    model = _fit(x_train, y_train, C, max_iter, seed)
    return {**_topk(model.predict_proba(x_test), model.classes_, y_test), "C": C}
