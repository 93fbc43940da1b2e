"""Batched feature extraction over a labelled dataset, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@torch.no_grad()
def extract_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,) long) of a dataset yielding (image tensor, label)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    features, labels = [], []
    for images, targets in tqdm(loader, desc="features", disable=not progress):
        features.append(feature_fn(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets).long())
    return torch.cat(features), torch.cat(labels)
