"""Run directories, logging and the features file shared by the CLIs."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LOGGER = logging.getLogger("fungi")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_logging(run_dir: Path) -> logging.Logger:
    """Log to stdout and ``<run_dir>/log.txt``."""
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


def load_features(path: str | Path) -> tuple[dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]], dict]:
    """Inverse of ``save_features`` -> ({split: (blocks, labels)}, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist (write one with fungi-extract)")
    splits: dict[str, tuple[dict, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("fungi", "{}"))
        for key in f.keys():
            split, name = key.split("/", 1)
            blocks, labels = splits.get(split, ({}, torch.empty(0)))
            if name == "labels":
                labels = f.get_tensor(key)
            else:
                blocks[name] = f.get_tensor(key)
            splits[split] = (blocks, labels)
    return splits, meta
