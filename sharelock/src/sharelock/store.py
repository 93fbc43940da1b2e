"""Feature store: contiguous `.npy` shards (memory-mapped) + per-shard id lists + metadata (model, dim, dtype).

Layout of a store directory::

    metadata.json                    {"format", "model", "modality", "dim", "dtype", "backbone", "source"}
    shard_r000_000000.npy            (rows, dim) array, written to a temp name then renamed
    shard_r000_000000.json           {"ids": [...], "labels": [...] | null}; its presence marks the shard complete

Each writer process (one per GPU rank) appends its own shards, so extraction over several GPUs needs no coordination,
and a killed run resumes by skipping the ids of completed shards. Reading any batch of rows touches at most one
memory map per shard, never one file per row.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharelock.config import read_json

FORMAT = "sharelock-features/1"
log = logging.getLogger(__name__)
DTYPES = ("float32", "float16")


def _read_metadata(path: Path) -> dict[str, Any]:
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no feature store at {path}: {meta_path} is missing (create one with `sharelock-features`)"
        )
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model: equal, or a Hugging Face id and a local folder (or two
    folders) with the same last component, e.g. ``meta-llama/Meta-Llama-3-8B`` and ``/models/Meta-Llama-3-8B``.
    Vision store names with a local checkpoint (``timm_name@/path/weights.pth``) must be equal: weight files often
    share a name (``model.safetensors``)."""
    if a == b:
        return True
    if "@" in str(a) or "@" in str(b):
        return False
    name_a, name_b = (Path(str(x).rstrip("/")).name.lower() for x in (a, b))
    if name_a and name_a == name_b:
        log.warning("taking %r and %r for the same model (same name)", a, b)
        return True
    return False


def _check_model(path: Path, meta: dict, model: str | None, modality: str | None) -> None:
    if model is not None and not same_model(meta["model"], model):
        raise ValueError(f"feature store {path} was made with model {meta['model']!r}, but {model!r} was expected")
    if modality is not None and meta["modality"] != modality:
        raise ValueError(f"feature store {path} holds {meta['modality']} features, but {modality} was expected")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _complete_shards(path: Path) -> list[Path]:
    return sorted(p.with_suffix(".npy") for p in path.glob("shard_*.json") if p.with_suffix(".npy").is_file())


class FeatureWriter:
    """Append features to a (new or existing) store; ids already present are reported by `done`. Use as a context
    manager or call `close()` to flush the last partial shard."""

    def __init__(
        self,
        path: str | Path,
        model: str,
        modality: str,
        dim: int,
        dtype: str = "float32",
        shard_size: int = 10000,
        rank: int = 0,
        backbone: dict | None = None,
        source: dict | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unsupported store dtype {dtype!r}; expected one of {DTYPES}")
        self.path, self.dim, self.dtype, self.shard_size, self.rank = Path(path), dim, dtype, shard_size, rank
        self.path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "model": model, "modality": modality, "dim": dim, "dtype": dtype}
        meta.update(backbone=backbone or {}, source=source or {})
        if (self.path / "metadata.json").is_file():
            old = _read_metadata(self.path)
            _check_model(self.path, old, model, modality)
            if old["dim"] != dim or old["dtype"] != dtype:
                raise ValueError(
                    f"feature store {self.path} holds dim={old['dim']} {old['dtype']}, cannot append dim={dim} {dtype}"
                )
            changed = _differences(old.get("backbone") or {}, meta["backbone"])
            if changed:
                raise ValueError(
                    f"feature store {self.path} was extracted with other backbone settings ({'; '.join(changed)}): "
                    "appending would mix features; write to a new store (out=DIR) or use the store's settings"
                )
        else:
            tmp = self.path / f"metadata.json.tmp{os.getpid()}"
            tmp.write_text(json.dumps(meta, indent=2))
            tmp.replace(self.path / "metadata.json")
        self.done: set[str] = set()
        for shard in _complete_shards(self.path):
            self.done.update(json.loads(shard.with_suffix(".json").read_text())["ids"])
        self._next = len(list(self.path.glob(f"shard_r{rank:03d}_*.json")))
        self._ids: list[str] = []
        self._feats: list[np.ndarray] = []
        self._labels: list[int] = []

    def add(self, ids: Sequence[str], features: torch.Tensor | np.ndarray, labels: Sequence[int] | None = None) -> None:
        """Buffer rows (N, dim); full shards are written as they fill."""
        feats = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if feats.ndim != 2 or feats.shape[1] != self.dim or feats.shape[0] != len(ids):
            raise ValueError(f"expected features of shape ({len(ids)}, {self.dim}), got {feats.shape}")
        self._ids += [str(i) for i in ids]
        self._feats.append(feats.astype(self.dtype))
        if labels is not None:
            self._labels += [int(x) for x in labels]
        self.done.update(str(i) for i in ids)
        while len(self._ids) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        if n == 0:
            return
        feats = np.concatenate(self._feats)
        ids, labels = self._ids[:n], self._labels[:n] if self._labels else None
        stem = self.path / f"shard_r{self.rank:03d}_{self._next:06d}"
        tmp = self.path / f"{stem.name}.tmp.npy"
        np.save(tmp, feats[:n])
        tmp.replace(stem.with_suffix(".npy"))
        tmp_json = self.path / f"{stem.name}.tmp.json.part"
        tmp_json.write_text(json.dumps({"ids": ids, "labels": labels}))
        tmp_json.replace(stem.with_suffix(".json"))
        self._next += 1
        self._ids, self._feats = self._ids[n:], [feats[n:]]
        self._labels = self._labels[n:]

    def close(self) -> None:
        """Write the remaining buffered rows as a last (short) shard."""
        self._flush(len(self._ids))

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


class FeatureStore:
    """Read-only view of a store. `model`/`modality` (if given) must match the metadata, else ValueError naming both.

    `get(ids)` and `rows(indices)` return float32 (N, dim) tensors; rows come from memory maps grouped by shard
    (`in_memory=True` loads everything into one array instead).
    """

    def __init__(
        self, path: str | Path, model: str | None = None, modality: str | None = None, in_memory: bool = False
    ) -> None:
        self.path = Path(path)
        self.meta = _read_metadata(self.path)
        _check_model(self.path, self.meta, model, modality)
        self.model, self.modality, self.dim = self.meta["model"], self.meta["modality"], int(self.meta["dim"])
        self.ids: list[str] = []
        labels: list[int] = []
        self._shards: list[np.ndarray] = []
        sizes = []
        for shard in _complete_shards(self.path):
            info = json.loads(shard.with_suffix(".json").read_text())
            arr = np.load(shard, mmap_mode="r")
            if arr.shape != (len(info["ids"]), self.dim):
                raise ValueError(f"corrupt shard {shard}: shape {arr.shape}, expected ({len(info['ids'])}, {self.dim})")
            self._shards.append(arr)
            self.ids += info["ids"]
            labels += info["labels"] or []
            sizes.append(len(info["ids"]))
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.index = {sample_id: row for row, sample_id in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise ValueError(f"feature store {self.path} holds duplicate ids")
        self.labels = np.asarray(labels, dtype=np.int64) if labels else None
        if self.labels is not None and len(self.labels) != len(self.ids):
            raise ValueError(f"feature store {self.path}: some shards have labels and some do not")
        self._memory = np.concatenate(self._shards) if in_memory and self._shards else None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, model={self.model!r}, n={len(self)}, dim={self.dim})"

    def positions(self, ids: Sequence[str], other: str | None = None) -> np.ndarray:
        """Row numbers of `ids`; missing ids raise KeyError naming this store (and `other`, who asked)."""
        missing = [i for i in ids if str(i) not in self.index]
        if missing:
            who = f" (required by {other})" if other else ""
            raise KeyError(
                f"feature store {self.path} (model {self.model!r}) lacks {len(missing)} of {len(ids)} requested ids"
                f"{who}, e.g. {missing[:5]}"
            )
        return np.fromiter((self.index[str(i)] for i in ids), dtype=np.int64, count=len(ids))

    def rows(self, indices: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Rows at global positions `indices` (any order, repeats allowed) as a float32 tensor (N, dim)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for feature store {self.path} with {len(self)} rows")
        if self._memory is not None:
            return torch.from_numpy(self._memory[indices].astype(np.float32, copy=False))
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for shard in np.unique(shard_of):
            sel = np.nonzero(shard_of == shard)[0]
            local = indices[sel] - self.offsets[shard]
            order = np.argsort(local, kind="stable")  # sorted reads are sequential on disk
            out[sel[order]] = self._shards[shard][local[order]]
        return torch.from_numpy(out)

    def get(self, ids: Sequence[str]) -> torch.Tensor:
        """Features of `ids` (N, dim) float32; missing ids raise KeyError."""
        return self.rows(self.positions(ids))

    def load_all(self) -> torch.Tensor:
        """All rows in store order (N, dim) float32."""
        return self.rows(np.arange(len(self)))
