"""Linear probing on frozen features with scikit-learn's logistic regression."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0)


def _numpy(x) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16


def _fit(features, labels, C: float, max_iter: int, seed: int, fit_intercept: bool, tol: float):
    return LogisticRegression(C=C, max_iter=max_iter, random_state=seed, fit_intercept=fit_intercept, tol=tol).fit(
        features, labels
    )


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
    *,
    lambdas: Sequence[float] | None = None,
    val_fraction: float = 0.1,
    fit_intercept: bool = True,
    tol: float = 1e-4,
    standardize: bool = True,
    val_features=None,
    val_labels=None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of a multinomial logistic regression (L2) on (standardised) features.

    ``C=None`` picks the inverse regularisation on a stratified ``val_fraction`` of the training split, then refits on
    all of it; the chosen value is returned as "C". The grid is ``DEFAULT_C_GRID``, or, with ``lambdas``, the
    penalties of the mean-loss form (1/n) sum loss + lambda/2 |w|^2 (cyanure's), C = 1/(n lambda) for the n samples
    of each fit; the chosen one is also returned as "lambda".

    With ``val_features`` (M, D) and ``val_labels`` (M,), a validation split of its own, ``C=None`` scores each
    candidate fitted on the whole training split on them instead (``val_fraction`` is unused), and the final model
    is fitted on the training split only (n = N in C = 1/(n lambda)); standardisation is fitted on the training split.
    With a given ``C`` they are not used.
    """
    if (val_features is None) != (val_labels is None):
        raise ValueError("val_features and val_labels go together: pass both or neither")
    x_train, y_train = _numpy(train_features).astype(np.float64), _numpy(train_labels).astype(np.int64)
    x_test, y_test = _numpy(test_features).astype(np.float64), _numpy(test_labels).astype(np.int64)
    x_given = y_given = None
    if val_features is not None:
        x_given, y_given = _numpy(val_features).astype(np.float64), _numpy(val_labels).astype(np.int64)
        dims = x_train.shape[1]
        if x_given.ndim != 2 or x_given.shape[1] != dims or not len(x_given) == len(y_given) > 0:
            raise ValueError(
                f"validation features of shape {tuple(x_given.shape)} with {len(y_given)} labels; expected (M, {dims}) "
                f"with M >= 1 labels (the training features have {dims} dims)"
            )
    if standardize:
        scaler = StandardScaler().fit(x_train)
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
        if x_given is not None:
            x_given = scaler.transform(x_given)
    fit = dict(max_iter=max_iter, seed=seed, fit_intercept=fit_intercept, tol=tol)
    chosen_lambda = None
    if C is None:
        if x_given is not None:
            x_fit, x_val, y_fit, y_val = x_train, x_given, y_train, y_given
        else:
            stratify = y_train if np.bincount(y_train).min() >= 2 else None
            x_fit, x_val, y_fit, y_val = train_test_split(
                x_train, y_train, test_size=val_fraction, random_state=seed, stratify=stratify
            )
        grid = [1.0 / (len(y_fit) * lam) for lam in lambdas] if lambdas is not None else list(DEFAULT_C_GRID)
        scores = [_fit(x_fit, y_fit, c, **fit).score(x_val, y_val) for c in grid]
        best = int(np.argmax(scores))
        if lambdas is not None:
            chosen_lambda = float(lambdas[best])
            C = 1.0 / (len(y_train) * chosen_lambda)
        else:
            C = grid[best]
    model = _fit(x_train, y_train, C, **fit)
    result = {**_topk(model.predict_proba(x_test), model.classes_, y_test), "C": C}
    return result if chosen_lambda is None else {**result, "lambda": chosen_lambda}
