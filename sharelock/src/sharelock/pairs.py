"""Training pairs: vision rows + one caption feature per sample, from feature stores or from tensors."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from sharelock.store import FeatureStore, same_model


class StorePairs:
    """Concatenated datasets, each a vision store plus >= 1 caption stores (one picked uniformly per access, the
    reference's caption augmentation). Samples are the vision store's ids in sorted order; every caption store must
    hold all of them (else KeyError naming both stores)."""

    def __init__(self, datasets: Sequence[dict], in_memory: bool = False) -> None:
        if not datasets:
            raise ValueError("data.datasets is empty: give at least one {vision: STORE, text: [STORES]}")
        if isinstance(datasets, str | dict):
            raise ValueError(f"data.datasets must be a list of {{vision: STORE, text: [STORES]}}, got {datasets!r}")
        for d, spec in enumerate(datasets):
            if not isinstance(spec, dict):
                raise ValueError(f"data.datasets[{d}] must be {{vision: STORE, text: [STORES]}}, got {spec!r}")
            for key in ("vision", "text"):
                if key not in spec:
                    raise ValueError(f"data.datasets[{d}] lacks {key!r} (expected vision, text; got {sorted(spec)})")
        self.vision: list[FeatureStore] = []
        self.texts: list[list[FeatureStore]] = []
        ds_of, vrows, trows = [], [], []
        max_caps = max(len(_as_list(d["text"])) for d in datasets)
        for d, spec in enumerate(datasets):
            vision = FeatureStore(spec["vision"], modality="image", in_memory=in_memory)
            texts = [FeatureStore(p, modality="text", in_memory=in_memory) for p in _as_list(spec["text"])]
            if not texts:
                raise ValueError(f"dataset {spec['vision']} has no caption store (data.datasets[{d}].text)")
            if self.vision and (vision.dim != self.vision[0].dim or not same_model(vision.model, self.vision[0].model)):
                raise ValueError(
                    f"vision stores {self.vision[0].path} ({self.vision[0].model}, {self.vision[0].dim}) and "
                    f"{vision.path} ({vision.model}, {vision.dim}) come from different vision models"
                )
            ref_text = self.texts[0][0] if self.texts else texts[0]
            for store in texts:
                if store.dim != ref_text.dim or not same_model(store.model, ref_text.model):
                    raise ValueError(
                        f"caption stores {ref_text.path} ({ref_text.model}, {ref_text.dim}) and {store.path} "
                        f"({store.model}, {store.dim}) come from different language models"
                    )
            ids = sorted(vision.ids)
            vrow = vision.positions(ids)
            trow = np.full((len(ids), max_caps), -1, dtype=np.int64)
            for k, store in enumerate(texts):
                trow[:, k] = store.positions(ids, other=f"vision store {vision.path}")
            self.vision.append(vision)
            self.texts.append(texts)
            ds_of.append(np.full(len(ids), d))
            vrows.append(vrow)
            trows.append(trow)
        self.ds_of, self.vrow, self.trow = np.concatenate(ds_of), np.concatenate(vrows), np.concatenate(trows)
        self.n_caps = np.array([len(t) for t in self.texts])
        self.vision_dim, self.text_dim = self.vision[0].dim, self.texts[0][0].dim

    def __len__(self) -> int:
        return len(self.ds_of)

    def batch(self, indices: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision (B, vision_dim) and caption (B, text_dim) features of samples `indices`."""
        indices = np.asarray(indices)
        ds = self.ds_of[indices]
        choice = np.floor(rng.random(len(indices)) * self.n_caps[ds]).astype(np.int64)
        v = torch.empty(len(indices), self.vision_dim)
        t = torch.empty(len(indices), self.text_dim)
        for d in np.unique(ds):
            sel = np.nonzero(ds == d)[0]
            v[sel] = self.vision[d].rows(self.vrow[indices[sel]])
            for k in np.unique(choice[sel]):
                sub = sel[choice[sel] == k]
                t[sub] = self.texts[d][k].rows(self.trow[indices[sub], k])
        return v, t

    def backbones(self) -> dict:
        """Backbone specs recorded in the stores (to rebuild the encoders at inference)."""
        return {
            "vision": self.vision[0].meta.get("backbone", {}).get("vision"),
            "text": self.texts[0][0].meta.get("backbone", {}).get("text"),
            "vision_model": self.vision[0].model,
            "text_model": self.texts[0][0].model,
        }


class TensorPairs:
    """In-memory pairs: vision features (N, Dv) and, per sample, one row of `text_features` chosen by `text_index`
    (e.g. the class-name caption of each image in the probing protocol)."""

    def __init__(self, vision: torch.Tensor, text_features: torch.Tensor, text_index: torch.Tensor | np.ndarray):
        self.v, self.t, self.index = vision.float(), text_features.float(), np.asarray(text_index)
        self.vision_dim, self.text_dim = self.v.shape[1], self.t.shape[1]

    def __len__(self) -> int:
        return len(self.v)

    def batch(self, indices: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision (B, vision_dim) and text (B, text_dim) features of samples `indices` (`rng` unused)."""
        indices = np.asarray(indices)
        return self.v[indices], self.t[self.index[indices]]

    def backbones(self) -> dict:
        """No backbone specs: in-memory features record none ({})."""
        return {}


class Subset:
    """A view of pairs restricted to `indices`."""

    def __init__(self, pairs, indices: np.ndarray) -> None:
        self.pairs, self.indices = pairs, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`pairs.batch` of the subset's samples `indices` (positions in the subset)."""
        return self.pairs.batch(self.indices[np.asarray(indices)], rng)


def split_train_val(n: int, val_size: int | float, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The reference split: shuffle range(n) with `random.Random(seed)`, the first `val_size` are validation.
    A float in (0, 1) is a fraction of n."""
    if isinstance(val_size, float) and 0 < val_size < 1:
        val_size = int(round(val_size * n))
    val_size = int(val_size)
    if not 0 <= val_size < n:
        raise ValueError(f"data.val_size={val_size} must be smaller than the number of samples ({n})")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return np.array(order[val_size:], dtype=np.int64), np.array(order[:val_size], dtype=np.int64)


def split_per_dataset(pairs, val_size: int | float, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into `pairs` with `split_train_val` applied to each concatenated dataset on its own, as
    the reference builds a train and a val split per dataset and concatenates them (`val_size` per dataset). Pairs
    without datasets (no `ds_of`, e.g. TensorPairs) are one dataset."""
    dataset_of = getattr(pairs, "ds_of", None)
    if dataset_of is None:
        return split_train_val(len(pairs), val_size, seed)
    train, val = [], []
    for d in np.unique(dataset_of):
        members = np.nonzero(dataset_of == d)[0]
        try:
            train_idx, val_idx = split_train_val(len(members), val_size, seed)
        except ValueError as err:  # val_size applies to each dataset: name the one that is too small
            vision = getattr(pairs, "vision", None)
            where = f" ({vision[d].path})" if vision else ""
            raise ValueError(f"data.datasets[{d}]{where}: {err}") from None
        train.append(members[train_idx])
        val.append(members[val_idx])
    return np.concatenate(train), np.concatenate(val)


def subsample(indices: np.ndarray, size: int | float | None, seed: int = 42) -> np.ndarray:
    """The first `size` of `indices` in a seeded random order, kept in their given order: nested subsets for
    data-scaling curves, since a smaller size keeps a subset of a larger one's samples, and all of them (1.0) is
    `indices` itself, the run without a subset. A float in (0, 1] is a fraction of the indices; None keeps them all."""
    indices = np.asarray(indices, dtype=np.int64)
    if size is None:
        return indices
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ValueError(f"data.train_size={size}: a fraction must be in (0, 1]")
        size = int(round(size * len(indices)))
    if not 1 <= size <= len(indices):
        raise ValueError(f"data.train_size={size} must be between 1 and the {len(indices)} training samples")
    return indices[np.sort(np.random.default_rng(seed).permutation(len(indices))[:size])]


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]
