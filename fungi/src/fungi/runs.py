"""Run directories, logging and the features file shared by the CLIs."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

LOGGER = logging.getLogger("fungi")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_logging(run_dir: Path) -> logging.Logger:
    """Log to stdout and ``<run_dir>/log.txt``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file; the run folder (run_dir, out) must be a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    LOGGER.setLevel(logging.INFO)
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")):
        handler.setFormatter(fmt)
        LOGGER.addHandler(handler)
    LOGGER.propagate = False
    return LOGGER


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; ValueError for a device this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device; expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine; use device=cpu or auto")
    return resolved


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Config dtype name -> torch dtype ('auto': bfloat16 on GPU, float32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {name!r}")
    return DTYPES[name]


def save_features(path: Path, splits: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]], meta: dict) -> None:
    """{split: (blocks, labels)} -> one safetensors file with keys '<split>/<block>' and '<split>/labels'."""
    tensors = {}
    for split, (blocks, labels) in splits.items():
        tensors.update({f"{split}/{name}": t.float().contiguous() for name, t in blocks.items()})
        tensors[f"{split}/labels"] = labels.long().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"fungi": json.dumps(meta)})
    tmp.replace(path)


def read_tensors_and_meta(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the ``fungi`` JSON metadata of a safetensors file written here (features or an extractor
    state); a truncated or foreign file is a ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, json.loads((f.metadata() or {}).get("fungi", "{}"))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): truncated, or another format") from None


def load_features(path: str | Path) -> tuple[dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]], dict]:
    """Inverse of ``save_features`` -> ({split: (blocks, labels)}, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist (write one with fungi-extract)")
    splits: dict[str, tuple[dict, torch.Tensor]] = {}
    tensors, meta = read_tensors_and_meta(path)
    for key, tensor in tensors.items():
        if "/" not in key:
            raise ValueError(
                f"{path}: key {key!r} is not '<split>/<block>' or '<split>/labels'; expected a features file written "
                "by fungi-extract"
            )
        split, name = key.split("/", 1)
        blocks, labels = splits.get(split, ({}, torch.empty(0)))
        if name == "labels":
            labels = tensor
        else:
            blocks[name] = tensor
        splits[split] = (blocks, labels)
    for split, (blocks, labels) in splits.items():
        if f"{split}/labels" not in tensors:
            raise ValueError(f"{path}: split {split!r} has no {split}/labels")
        for name, block in blocks.items():
            if block.ndim != 2 or block.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{path}: {split}/{name} has shape {tuple(block.shape)}, expected ({labels.shape[0]}, D): one row "
                    f"per entry of {split}/labels"
                )
    dims = {}
    for split, (blocks, _) in splits.items():
        for name, block in blocks.items():
            if dims.setdefault(name, (split, block.shape[1]))[1] != block.shape[1]:
                first, size = dims[name]
                raise ValueError(
                    f"{path}: {split}/{name} has {block.shape[1]} dimensions but {first}/{name} has {size}: the "
                    "splits come from different extractions"
                )
    return splits, meta
