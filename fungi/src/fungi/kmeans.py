"""Seeded k-means with inner-product assignment, as the reference's DeepCluster ablation fits its prototypes."""

from __future__ import annotations

import torch

from funai_common.search import nearest_neighbors


def inner_product_kmeans(
    x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 10, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of rows ``x`` (N, D) -> (centroids (k, D), assignments (N,)).

    Centroids start as k distinct rows drawn with ``gen``; each of ``iters`` rounds assigns every row to the centroid
    of largest inner product (exact search, faiss when installed: ``funai_common.search``) and moves each centroid to
    the mean of its rows; an empty cluster keeps its centroid; centroids are not renormalised (as the reference). The
    returned assignments are those to the final centroids. On CUDA the sums (``index_add_``) may differ in the last
    bits from run to run unless deterministic algorithms are on.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of rows, got k={k} for {n} rows")
    x = x.float()
    centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    for _ in range(iters):
        assignments = nearest_neighbors(x, centroids, 1, backend)[1][:, 0].to(x.device)
        counts = torch.bincount(assignments, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].float()
    return centroids, nearest_neighbors(x, centroids, 1, backend)[1][:, 0].to(x.device)
