"""Safe loading of model weights: safetensors, or legacy PyTorch files read without unpickling."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

WRAPPER_KEYS = ("teacher", "model", "state_dict")


def load_state_dict(
    path, keys: Sequence[str] = WRAPPER_KEYS, strip_prefixes: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt``/``.ckpt`` read with ``weights_only=True`` (plain
    containers, tensors and the ``argparse.Namespace`` of DINO-style training checkpoints; no other objects).

    In a legacy file the first of ``keys`` holding a dict is unwrapped (``teacher`` for DINO/DoRA releases,
    ``model``/``state_dict`` for others); each name loses the first of ``strip_prefixes`` it starts with,
    repeatedly (``module.backbone.blocks...`` -> ``blocks...``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a .safetensors or .pth state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        # full training checkpoints (DINO, DoRA) also hold their argparse arguments: allow that plain container
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
        for key in keys:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not strip_prefixes:
        return state
    out = {}
    for name, tensor in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in strip_prefixes:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        out[name] = tensor
    return out
