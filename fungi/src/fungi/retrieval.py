"""Retrieval mAP of the revisited Oxford / Paris benchmarks (Radenovic et al., CVPR 2018), as DINO's and the FUNGI
reference's ``compute_map``: per query, junk images are skipped in the ranking, AP is the trapezoidal area under the
precision-recall curve over the ranked positives, and queries without positives are left out of the mean.

Setups: Medium (positives easy + hard, junk ignored) and Hard (positives hard, junk and easy ignored).
Everything here is numpy on given features or rankings; the datasets live in ``fungi.data``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SETUPS = ("medium", "hard")


def setup_lists(query: Mapping[str, Sequence[int]], setup: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, junk) database indices of one query's ground truth ('easy', 'hard', 'junk') in a setup:
    medium -> (easy + hard, junk); hard -> (hard, junk + easy)."""
    easy, hard, junk = (np.asarray(query.get(k, ()), dtype=np.int64).reshape(-1) for k in ("easy", "hard", "junk"))
    if setup == "medium":
        return np.concatenate([easy, hard]), junk
    if setup == "hard":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"unknown setup {setup!r}; expected one of {SETUPS}")


def rank_database(database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Database indices of each query by decreasing inner product: (N, D), (Q, D) -> (Q, N); ties keep database
    order (a stable sort)."""
    similarity = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
    return np.argsort(-similarity, axis=1, kind="stable")


def positive_ranks(ranking: np.ndarray, positives: Sequence[int], junk: Sequence[int] = ()) -> np.ndarray:
    """0-based ranks of the positives found in ``ranking`` (N,) once the junk images before each are removed,
    increasing. A positive absent from the ranking has no rank (it still counts in ``average_precision``'s total)."""
    ranking = np.asarray(ranking)
    found = np.flatnonzero(np.isin(ranking, positives))
    junk_at = np.flatnonzero(np.isin(ranking, junk))
    return found - np.searchsorted(junk_at, found)  # junk strictly before each positive


def average_precision(ranks: np.ndarray, num_positives: int) -> float:
    """AP of sorted 0-based positive ranks (junk already removed) with ``num_positives`` positives in all.

    The k-th retrieved positive (k = 0, 1, ...) at rank r adds the trapezoid between the precision before it,
    k / r (1 at r = 0), and after it, (k + 1) / (r + 1), over a recall step of 1 / num_positives.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if num_positives <= 0:
        raise ValueError("average_precision needs num_positives >= 1")
    k = np.arange(len(ranks), dtype=np.float64)
    before = np.where(ranks == 0, 1.0, k / np.maximum(ranks, 1.0))
    after = (k + 1.0) / (ranks + 1.0)
    return float(np.sum(before + after) / (2.0 * num_positives))


def precision_at_k(ranks: np.ndarray, k: int) -> float:
    """Precision at k of sorted 0-based positive ranks (junk removed), as the benchmark's ``compute_map``: the share
    of the top kq ranks holding positives, kq = min(k, 1-based rank of the last retrieved positive); so a query whose
    positives all lie in the top k scores 1 only if nothing else comes before its last positive. 0 without ranks."""
    ranks = np.asarray(ranks)
    if not len(ranks):
        return 0.0
    kq = min(int(k), int(ranks.max()) + 1)
    return float(np.count_nonzero(ranks + 1 <= kq) / kq)


def mean_precision_at_k(
    rankings: np.ndarray, ground_truth: Sequence[Mapping[str, Sequence[int]]], setup: str, k: int = 10
) -> float:
    """mP@k over the queries with at least one positive in a setup (NaN when none has one)."""
    values = []
    for ranking, query in zip(rankings, ground_truth):
        positives, junk = setup_lists(query, setup)
        if len(positives):
            values.append(precision_at_k(positive_ranks(ranking, positives, junk), k))
    return float(np.mean(values)) if values else float("nan")


def mean_average_precision(
    rankings: np.ndarray, ground_truth: Sequence[Mapping[str, Sequence[int]]], setup: str
) -> tuple[float, np.ndarray]:
    """mAP of rankings (Q, N) against per-query ground truth ('easy', 'hard', 'junk' database indices) in a setup
    -> (mAP over the queries with at least one positive, per-query AP (Q,) with NaN for queries without positives).
    The mAP is NaN when no query has a positive."""
    if len(rankings) != len(ground_truth):
        raise ValueError(f"{len(rankings)} rankings for {len(ground_truth)} ground-truth queries")
    aps = np.full(len(ground_truth), np.nan)
    for i, (ranking, query) in enumerate(zip(rankings, ground_truth)):
        positives, junk = setup_lists(query, setup)
        if len(positives):
            aps[i] = average_precision(positive_ranks(ranking, positives, junk), len(positives))
    valid = ~np.isnan(aps)
    return (float(aps[valid].mean()) if valid.any() else float("nan")), aps


def revisited_map(database: np.ndarray, queries: np.ndarray, ground_truth: Sequence[Mapping]) -> dict[str, float]:
    """Medium and Hard mAP and mP@10 in percent of query features (Q, D) against database features (N, D), ranked by
    inner product -> {'mAP_M', 'mAP_H', 'mP@10_M', 'mP@10_H'}."""
    rankings = rank_database(database, queries)
    out = {}
    for setup, suffix in (("medium", "M"), ("hard", "H")):
        out[f"mAP_{suffix}"] = 100.0 * mean_average_precision(rankings, ground_truth, setup)[0]
    for setup, suffix in (("medium", "M"), ("hard", "H")):
        out[f"mP@10_{suffix}"] = 100.0 * mean_precision_at_k(rankings, ground_truth, setup, 10)
    return out


def restrict_ground_truth(
    gnd: Sequence[Mapping], database_ids: Sequence[int], query_ids: Sequence[int]
) -> tuple[list[dict], int]:
    """Ground truth of the extracted queries in terms of the extracted database rows.

    ``gnd``: the file's per-query dicts (imlist indices); ``database_ids`` / ``query_ids``: the imlist / qimlist index
    of each feature row. Returns ([{'easy', 'hard', 'junk'} as database row indices] per query row, number of
    ground-truth entries dropped because their image is not among the database rows, e.g. after ``limit``).
    """
    row_of = {int(d): r for r, d in enumerate(database_ids)}
    out, dropped = [], 0
    for q in query_ids:
        if not 0 <= int(q) < len(gnd):
            raise ValueError(f"query id {int(q)} is not in the ground truth ({len(gnd)} queries)")
        entry = {}
        for key in ("easy", "hard", "junk"):
            ids = [int(i) for i in np.asarray(gnd[int(q)].get(key, ()), dtype=np.int64).reshape(-1)]
            entry[key] = np.asarray([row_of[i] for i in ids if i in row_of], dtype=np.int64)
            dropped += len(ids) - len(entry[key])
        out.append(entry)
    return out, dropped
