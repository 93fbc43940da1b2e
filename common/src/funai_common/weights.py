"""Safe loading of model weights: safetensors, or legacy PyTorch files read without unpickling."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

WRAPPER_KEYS = ("teacher", "model", "state_dict")


class UnreadableCheckpointError(pickle.UnpicklingError, ValueError):
    """A ``.pth`` file that is not a state dict of plain tensors (truncated, another format, or holding Python
    objects, which are never unpickled); a ValueError for the command lines, an UnpicklingError for callers that
    explain refused objects their own way."""

    def __init__(self, path: str | Path, err: Exception):
        text = str(err)
        if "WeightsUnpickler error:" in text:  # the reason, without torch's advice to drop weights_only
            text = "weights only load failed: " + text.split("WeightsUnpickler error:", 1)[1]
            text = text.split("Check the documentation")[0]
        super().__init__(f"checkpoint {path} is not a readable PyTorch state dict ({' '.join(text.split())})")


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
        state = load_safetensors(path)
    else:
        # full training checkpoints (DINO, DoRA) also hold their argparse arguments: allow that plain container
        # (torch >= 2.5; older versions refuse such files)
        allow = getattr(torch.serialization, "safe_globals", None)
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:  # garbage, or Python objects beyond tensors (never unpickled)
                raise UnreadableCheckpointError(path, err) from None
            except RuntimeError as err:  # not a zip archive: a truncated download, or another kind of file
                if "PytorchStreamReader" not in str(err):
                    raise
                raise UnreadableCheckpointError(path, err) from None
        for key in keys:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    return strip_prefixes_from(state, strip_prefixes)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file(path)``; a truncated or non-safetensors file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): truncated, or another format") from None


def strip_prefixes_from(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Names without any leading run of ``prefixes`` (``module.backbone.blocks...`` -> ``blocks...``)."""
    prefixes = tuple(prefixes)
    if not prefixes:
        return state
    out = {}
    for name, tensor in state.items():
        while name.startswith(prefixes):
            name = name[len(next(p for p in prefixes if name.startswith(p))) :]
        out[name] = tensor
    return out


def fit_to_timm_vit(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` adapted to a timm ``VisionTransformer`` by timm's own checkpoint filter: a position table saved at
    another resolution is resampled, the DINOv2 torch.hub layout (``mask_token``, ``register_tokens``) renamed. A
    checkpoint of another patch size is refused (ValueError) rather than resampled. Other models: unchanged."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        return state
    saved, own = state.get("patch_embed.proj.weight"), model.patch_embed.proj.weight
    if saved is not None and saved.ndim == 4 and saved.shape[-2:] != own.shape[-2:]:
        raise ValueError(
            f"checkpoint patch size {tuple(saved.shape[-2:])} differs from the model's {tuple(own.shape[-2:])}"
        )
    if "register_tokens" in state and "mask_token" not in state:
        state = {**state, "mask_token": torch.zeros(1)}  # timm converts the hub layout only when it sees one
    return checkpoint_filter_fn(_fold_cls_position(state, model), model)


def _fold_cls_position(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A DINOv2-code checkpoint without registers keeps the cls position inside ``pos_embed`` (1, 1 + M*M, D); timm
    converts that layout only when it sees ``register_tokens``. For a model whose table covers the patches only
    (``no_embed_class``, e.g. timm's reg4 class built with ``reg_tokens=0``) the cls position is added to
    ``cls_token``, as the DINOv2 code adds it at run time."""
    pos = state.get("pos_embed")
    if not getattr(model, "no_embed_class", False) or pos is None or pos.ndim != 3 or "register_tokens" in state:
        return state
    n = pos.shape[1]
    if math.isqrt(n) ** 2 == n or math.isqrt(n - 1) ** 2 != n - 1 or "cls_token" not in state:
        return state  # already a patch-only table (timm layout)
    return {**state, "cls_token": state["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}


def weights_unavailable(name: str, err: OSError, hint: str) -> FileNotFoundError:
    """The error for pretrained weights that cannot be fetched (offline, not cached): the Hub's own messages do not
    name the model. ``hint`` says how to give local weights instead."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):  # the Hub retries for ~50 s
        hint += " (on a machine without internet, HF_HUB_OFFLINE=1 gives this error at once)"
    return FileNotFoundError(f"pretrained weights of {name} not available ({reason}); {hint}")


def create_timm_model(
    name: str, pretrained: bool = False, label: str | None = None, hint: str | None = None, **kwargs
) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` with errors that name the model: ValueError for a
    name timm does not know, and for pretrained weights that cannot be fetched ``weights_unavailable``, naming
    ``label`` (default "timm model <name>") followed by ``hint``."""
    import timm

    label = label or f"timm model {name}"
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise ValueError(f"{label}: not a timm model name (timm.list_models() lists them)") from None
    except OSError as err:
        if not pretrained:
            raise
        raise weights_unavailable(
            label, err, hint or "download them once on a machine online (they are cached)"
        ) from err
