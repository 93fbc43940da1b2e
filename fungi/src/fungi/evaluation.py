"""Evaluation protocols of the paper on feature blocks: k-NN (PCA 512, k = 20), few-shot splits, linear probing,
k-means clustering, revisited Oxford / Paris retrieval mAP; every combination of the blocks present (embeddings, kl,
dino, simclr, deepcluster)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from fungi.objectives import OBJECTIVES
from fungi.projection import l2_normalize
from fungi.retrieval import revisited_map

SEED = 42
BLOCKS = ("embeddings", *OBJECTIVES)  # the order of the rows


# The paper's linear probe (spec c.; the reference's train_linear_concat_grads.py): cyanure multinomial logistic
# regression, L2, no intercept, tol 1e-3, 300 iterations, lambda from linspace(5e-6, 5e-4, 5) chosen on the dataset's
# validation split (then fitted on train only) or, without one, on an 80/20 split of train (then refitted on all of
# train); solved here by scikit-learn.
PAPER_LINEAR_PROBE = {
    "lambdas": tuple(float(v) for v in np.linspace(5e-6, 5e-4, 5)),
    "val_fraction": 0.2,
    "fit_intercept": False,
    "tol": 1e-3,
    "max_iter": 300,
    "standardize": False,
}


def check_lambda_split(train_labels, val_fraction: float = PAPER_LINEAR_PROBE["val_fraction"], seed: int = 0) -> None:
    """Raise ValueError before any fit when the stratified split of train that chooses the linear probe's lambda
    (``funai_common.linear.linear_probe`` without a validation split) cannot be drawn, e.g. 10 classes in 40 items:
    a 20 % part of 8 cannot hold one item per class."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(train_labels, dtype=np.int64)
    if len(y) and np.bincount(y).min() >= 2:  # linear_probe stratifies exactly then
        try:
            train_test_split(y, test_size=val_fraction, random_state=seed, stratify=y)
        except ValueError as err:
            raise ValueError(
                f"linear probe: the {val_fraction:.0%} split of {len(y)} training items that chooses lambda cannot be "
                f"stratified ({err}); set linear_C=VALUE, or extract a validation split (data.val_split)"
            ) from None


def concat_blocks(blocks: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Concatenate L2-normalised blocks in the given order: -> (N, sum of sizes)."""
    missing = [n for n in names if n not in blocks]
    if missing:
        raise KeyError(f"feature blocks {missing} not found; available: {sorted(blocks)}")
    return torch.cat([l2_normalize(blocks[n]) for n in names], dim=1)


def fit_pca(train: np.ndarray, test: np.ndarray, dim: int | None, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """PCA to ``dim`` fitted on train only (svd_solver='full', seed 42) -> (train, test, *others) projected; skipped
    when dims or samples are <= ``dim``, as the reference (``pca_dim < N and pca_dim < D``): a full-rank PCA would
    only centre and rotate, which changes inner-product rankings and intercept-free probes. ``others``: further
    splits (e.g. validation) projected with the same PCA."""
    if dim is None or dim <= 0 or train.shape[1] <= dim or train.shape[0] <= dim:
        return (train, test, *others)
    pca = PCA(n_components=dim, svd_solver="full", random_state=SEED).fit(train)
    return tuple(pca.transform(x) for x in (train, test, *others))


def _fit_knn(train_features, train_labels, test_features, k: int, pca_dim: int | None):
    """(fitted KNeighborsClassifier, test features after the train-fitted PCA)."""
    train, test = fit_pca(np.asarray(train_features, np.float64), np.asarray(test_features, np.float64), pca_dim)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train)), weights="uniform", metric="euclidean")
    return knn.fit(train, np.asarray(train_labels)), test


def knn_predict(train_features, train_labels, test_features, k: int = 20, pca_dim: int | None = 512) -> np.ndarray:
    """Paper k-NN: PCA fitted on train, then KNeighborsClassifier(k, uniform weights, Euclidean) -> predictions."""
    knn, test = _fit_knn(train_features, train_labels, test_features, k, pca_dim)
    return knn.predict(test)


def knn_scores(
    train_features, train_labels, test_features, test_labels, k: int = 20, pca_dim: int | None = 512
) -> dict[str, float]:
    """Paper k-NN top-1 and mean-per-class accuracy (%); with binary training labels also the ROC AUC (%) of the
    neighbours' vote share for the larger label (the reference's ``roc_curve(predict_proba[:, 1], pos_label=1)``),
    left out when the test labels hold a single class (AUC undefined)."""
    knn, test = _fit_knn(train_features, train_labels, test_features, k, pca_dim)
    scores = accuracy_scores(test_labels, knn.predict(test))
    positive = np.asarray(test_labels) == knn.classes_[-1]
    if len(knn.classes_) == 2 and 0 < positive.sum() < len(positive):
        scores["auc"] = 100.0 * float(roc_auc_score(positive, knn.predict_proba(test)[:, 1]))
    return scores


def accuracy_scores(labels, predictions) -> dict[str, float]:
    """Top-1 and mean-per-class accuracy in percent."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    per_class = [np.mean(predictions[labels == c] == c) for c in np.unique(labels)]
    return {"top1": 100.0 * float(np.mean(labels == predictions)), "mean_per_class": 100.0 * float(np.mean(per_class))}


def few_shot_indices(labels, shots: int) -> np.ndarray:
    """Indices of the first ``shots`` examples of each class, in dataset order (no shuffle)."""
    labels = np.asarray(labels)
    keep = []
    counts: dict[int, int] = {}
    for i, y in enumerate(labels.tolist()):
        if counts.get(y, 0) < shots:
            counts[y] = counts.get(y, 0) + 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def clustering_scores(features, labels, num_clusters: int | None = None, pca_dim: int | None = 512) -> dict:
    """k-means (k = number of classes, 10 inits, seed 42) on the features as given (FUNGI features: each block
    unit-length, the concatenation not re-normalised), after PCA to ``pca_dim`` -> NMI and ARI in percent."""
    x = np.asarray(features, np.float64)
    x, _ = fit_pca(x, x[:1], pca_dim)
    labels = np.asarray(labels)
    k = num_clusters or len(np.unique(labels))
    assign = KMeans(n_clusters=k, n_init=10, random_state=SEED).fit_predict(x)
    return {
        "nmi": 100.0 * normalized_mutual_info_score(labels, assign),
        "ari": 100.0 * adjusted_rand_score(labels, assign),
    }


def combinations(names: Sequence[str], incremental: bool = False) -> list[tuple[str, ...]]:
    """Every non-empty subset of the blocks in order (paper k-NN tables), or only the incremental prefixes
    (emb, emb+kl, emb+kl+dino, ...; paper linear tables)."""
    names = list(names)
    if incremental:
        return [tuple(names[: i + 1]) for i in range(len(names))]
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def evaluate_blocks(
    train_blocks: Mapping[str, torch.Tensor],
    train_labels,
    test_blocks: Mapping[str, torch.Tensor],
    test_labels,
    protocols: Sequence[str] = ("knn",),
    k: int = 20,
    pca_dim: int | None = 512,
    shots: int | None = None,
    linear_C: float | None = None,
    incremental: bool = False,
    *,
    val_blocks: Mapping[str, torch.Tensor] | None = None,
    val_labels=None,
) -> list[dict]:
    """One row per block combination with the requested protocols ('knn', 'fewshot', 'linear', 'clustering').

    ``val_blocks`` / ``val_labels``: the dataset's own validation split, used only by the linear probe to choose
    lambda (as the reference; without them an 80/20 split of train), projected with the PCA fitted on train. The
    chosen lambda is reported as 'linear_lambda'.
    """
    names = [n for n in BLOCKS if n in train_blocks]
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if (val_blocks is None) != (val_labels is None):
        raise ValueError("val_blocks and val_labels go together: pass both or neither")
    rows = []
    for combo in combinations(names, incremental):
        train = concat_blocks(train_blocks, combo).numpy()
        test = concat_blocks(test_blocks, combo).numpy()
        row: dict = {"features": "+".join(combo)}
        if "knn" in protocols:
            scores = knn_scores(train, train_labels, test, test_labels, k, pca_dim)
            row.update({f"knn_{key}": v for key, v in scores.items()})
        if "fewshot" in protocols and shots:
            idx = few_shot_indices(train_labels, shots)
            scores = knn_scores(train[idx], train_labels[idx], test, test_labels, k, pca_dim)
            row.update({f"{shots}shot_{key}": v for key, v in scores.items()})
        if "linear" in protocols and combo in combinations(names, incremental=True):  # as the paper's tables
            from funai_common.linear import linear_probe

            if val_blocks is None:
                tr, te = fit_pca(train, test, pca_dim)
                given = {}
            else:
                tr, te, va = fit_pca(train, test, pca_dim, concat_blocks(val_blocks, combo).numpy())
                given = {"val_features": va, "val_labels": np.asarray(val_labels)}
            scores = linear_probe(tr, train_labels, te, test_labels, C=linear_C, **given, **PAPER_LINEAR_PROBE)
            row["linear_top1"] = scores["top1"]
            if "lambda" in scores:
                row["linear_lambda"] = scores["lambda"]
        if "clustering" in protocols:
            row.update({f"kmeans_{key}": v for key, v in clustering_scores(test, test_labels, None, pca_dim).items()})
        rows.append(row)
    return rows


def evaluate_retrieval(
    database_blocks: Mapping[str, torch.Tensor],
    query_blocks: Mapping[str, torch.Tensor],
    ground_truth: Sequence[Mapping],
    pca_dim: int | None = 512,
    incremental: bool = False,
) -> list[dict]:
    """One row per block combination with the revisited Medium / Hard mAP (%) of the queries against the database.

    As the reference's retrieval script: each block L2-normalised and concatenated, PCA fitted on the database
    features (``fit_pca``), ranking by inner product. ``ground_truth``: per query row, 'easy' / 'hard' / 'junk'
    database row indices (``fungi.retrieval.restrict_ground_truth``).
    """
    names = [n for n in BLOCKS if n in database_blocks]
    rows = []
    for combo in combinations(names, incremental):
        database, queries = fit_pca(
            concat_blocks(database_blocks, combo).double().numpy(),
            concat_blocks(query_blocks, combo).double().numpy(),
            pca_dim,
        )
        scores = revisited_map(database, queries, ground_truth)
        rows.append({"features": "+".join(combo), **{f"retrieval_{key}": v for key, v in scores.items()}})
    return rows


def _cell(value) -> str:
    """Numbers with 2 decimals, those below 0.01 (a lambda) with 3 significant digits."""
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[Mapping]) -> str:
    """Plain-text table of result rows (numbers with 2 decimals, or 3 significant digits below 0.01)."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
