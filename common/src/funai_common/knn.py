"""Weighted k-NN classification, the DINO protocol (Caron et al. 2021, ``eval_knn.py``).

Each of the k nearest training features (cosine similarity) votes for its label with weight exp(cos / T); classes are
ranked by total vote. Unlike the reference, any number of test samples works (it crashed below 100).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from funai_common.search import NeighborIndex


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def knn_predictions(
    neighbor_sims: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Classes ranked by weighted vote, (M, num_classes); ties (also between classes with no vote) -> smaller index.

    neighbor_sims, neighbor_labels: (M, k) cosine similarities and labels of the k nearest training samples.
    """
    weights = torch.exp(neighbor_sims.double() / temperature)
    votes = torch.zeros(neighbor_sims.shape[0], num_classes, dtype=torch.float64, device=neighbor_sims.device)
    votes.scatter_add_(1, neighbor_labels, weights)
    # A stable descending sort keeps equal votes in increasing class order.
    return torch.sort(votes, dim=1, descending=True, stable=True).indices


def _accuracies(ranking: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[int, int]:
    hits = ranking == labels[:, None]
    return int(hits[:, 0].sum()), int(hits[:, : min(5, k)].any(1).sum())


def knn_classify_many(
    train_features,
    train_labels,
    test_features,
    test_labels,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    chunk_size: int = 8192,
) -> dict[int, dict[str, float]]:
    """DINO weighted k-NN for several k from one neighbour search: {k: {"top1": %, "top5": %}}.

    Features (N, D) are L2-normalised here; labels are integer class ids. A k larger than the training set votes with
    all N training samples (results stay keyed by the requested k; top-5 still ranks min(5, k) classes).
    """
    train_f = F.normalize(_as_tensor(train_features, torch.float32), dim=1)
    test_f = F.normalize(_as_tensor(test_features, torch.float32), dim=1)
    train_y = _as_tensor(train_labels).long().to(train_f.device)
    test_y = _as_tensor(test_labels).long()
    if train_f.shape[0] != train_y.shape[0] or test_f.shape[0] != test_y.shape[0]:
        raise ValueError(
            f"features and labels disagree: train {tuple(train_f.shape)} vs {tuple(train_y.shape)}, "
            f"test {tuple(test_f.shape)} vs {tuple(test_y.shape)}"
        )
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    for split, y in (("train", train_y), ("test", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"{split} labels must be class ids in [0, {num_classes}) (num_classes={num_classes}), "
                f"got {int(y.min())}..{int(y.max())}"
            )
    ks = sorted({int(k) for k in ks})
    n_train = train_f.shape[0]
    index = NeighborIndex(train_f, backend=backend)
    counts = {k: [0, 0] for k in ks}
    for start in range(0, test_f.shape[0], chunk_size):
        sims, idx = index.search(test_f[start : start + chunk_size], min(ks[-1], n_train))
        labels = test_y[start : start + chunk_size].to(sims.device)
        neighbor_labels = train_y.to(sims.device)[idx]
        for k in ks:
            used = min(k, n_train)
            ranking = knn_predictions(sims[:, :used], neighbor_labels[:, :used], num_classes, temperature)
            top1, top5 = _accuracies(ranking, labels, k)
            counts[k][0] += top1
            counts[k][1] += top5
    n = test_f.shape[0]
    return {k: {"top1": 100.0 * c[0] / n, "top5": 100.0 * c[1] / n} for k, c in counts.items()}


def knn_classify(
    train_features,
    train_labels,
    test_features,
    test_labels,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """DINO weighted k-NN top-1 / top-5 accuracy in percent: {"top1": ..., "top5": ...}.

    train_features (N, D), test_features (M, D), tensors or arrays; labels (N,), (M,) integer ids.
    """
    result = knn_classify_many(
        train_features,
        train_labels,
        test_features,
        test_labels,
        ks=(k,),
        temperature=temperature,
        num_classes=num_classes,
    )
    return next(iter(result.values()))
