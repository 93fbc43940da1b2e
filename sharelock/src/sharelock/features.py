"""Frozen backbones and their features: vision CLS token (timm) and last-token LLM hidden states (transformers)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from funai_common.vit import supports_dino_interpolation, use_dino_interpolation
from funai_common.weights import create_timm_model, fit_to_timm_vit, load_state_dict, weights_unavailable


# ----------------------------------------------------------------------------------------------- vision side
def build_vision_encoder(spec: dict[str, Any]) -> nn.Module:
    """A frozen timm model returning the CLS token after the final norm, (B, 3, H, W) -> (B, D).

    spec: {"model": timm name, "pretrained": bool, "checkpoint": local safetensors/.pth or None, "kwargs": {...}}.
    A ViT built with `dynamic_img_size: true` keeps its stored position table and interpolates it for other input
    sizes as the official DINO / DINOv2 code does (`use_dino_interpolation`): DINOv2 in timm
    (`vit_base_patch14_dinov2.lvd142m`, 518 px table) then gives the torch.hub model's features at 224 px; with
    registers (`vit_base_patch14_reg4_dinov2.lvd142m`) the rule of the hub's `dinov2_*14_reg` models. A local
    checkpoint goes through timm's checkpoint filter, so weights saved at another resolution or in the original
    layout (e.g. with a `mask_token`) load too.
    """
    # CLS-token pooling by default (ViTs); other timm backbones take e.g. kwargs {global_pool: avg}
    kwargs = {"global_pool": "token", **(spec.get("kwargs") or {})}
    checkpoint = spec.get("checkpoint")
    pretrained = bool(spec.get("pretrained", True)) and not checkpoint
    model = create_timm_model(
        spec["model"],
        pretrained,
        f"vision.model={spec['model']!r}",
        "offline, give local weights: vision.checkpoint=PATH vision.pretrained=false",
        num_classes=0,
        **kwargs,
    )
    if checkpoint:
        state = fit_to_timm_vit(load_state_dict(checkpoint, keys=("state_dict", "model")), model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"vision checkpoint {checkpoint} does not fit {spec['model']}: {err}") from None
    if supports_dino_interpolation(model):
        # torch.hub's DINOv2 with registers (dinov2_*14_reg) resamples to the target size with antialias, no offset
        registers = getattr(model, "num_reg_tokens", 0) > 0
        use_dino_interpolation(model, offset=0.0 if registers else 0.1, antialias=registers)
    return model.eval().requires_grad_(False)


def vision_dim(model: nn.Module) -> int:
    """Output width of a timm backbone built by `build_vision_encoder`."""
    return int(model.num_features)


# --------------------------------------------------------------------------------------------- language side
def build_language_encoder(spec: dict[str, Any], device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(frozen transformers base model, tokenizer) from {"model": HF id or local path, "dtype": "float32"|"bfloat16"}.

    `AutoModel` gives the base model (for Llama: after the final RMSNorm, without the LM head)."""
    from transformers import AutoModel, AutoTokenizer

    dtype = getattr(torch, spec.get("dtype") or "float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        model = AutoModel.from_pretrained(spec["model"], dtype=dtype).to(device)
    except OSError as err:  # not a local folder, and not in the Hugging Face cache nor downloadable
        raise weights_unavailable(
            f"language model {spec['model']!r}",
            err,
            "give a Hugging Face id that is cached or downloadable, or the path of a local model folder "
            "(offline: HF_HUB_OFFLINE=1 and a local path)",
        ) from None
    return model.eval().requires_grad_(False), tokenizer


def with_default_dtype(spec: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """A copy of a backbone spec (language model, or vision model for `sharelock-features`) whose missing dtype is
    bfloat16 on CUDA and float32 elsewhere."""
    default = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return {**spec, "dtype": spec.get("dtype") or default}


def language_spec(backbones: dict[str, Any], override: str | None = None) -> dict[str, Any]:
    """The language model a checkpoint encodes prompts with: the one recorded in its ``backbones`` (from the training
    stores), or ``override`` (HF id or path) with the default dtype."""
    spec = {"model": override, "dtype": None} if override else dict(backbones.get("text") or {})
    if not spec.get("model"):
        raise ValueError("the checkpoint records no language model: set language_model=HF_ID_OR_PATH")
    return spec


def text_dim(model: nn.Module) -> int:
    """Hidden size of a transformers model."""
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.get_text_config().hidden_size)


def _forward_accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_lengths(tokenizer: Any, texts: Sequence[str], max_length: int | None = None) -> list[int]:
    """Number of tokens of each text as the tokenizer encodes it (special tokens included)."""
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=max_length is not None, max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


@torch.no_grad()
def last_token_features(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None
) -> torch.Tensor:
    """Final hidden state at the last position of each text, (N, D) float32 on the CPU.

    Batches are left-padded whatever the tokenizer's `padding_side` (pad token = EOS if the tokenizer has none), so the
    last position is the last real token; texts are sorted by token length first (length bucketing: little padding)
    and the results put back in input order. Position ids follow the attention mask (from `padding_idx + 1` for
    RoBERTa-style embeddings), so padding does not shift positions and the features equal those of one text per call.
    A causal LM (e.g. LlamaForCausalLM) is run through its base model (the output after the final norm).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    base = getattr(model, "base_model", model)
    device = next(base.parameters()).device
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    use_positions = _forward_accepts(base, "position_ids")
    # RoBERTa-style embeddings number real tokens from padding_idx + 1, BERT/Llama-style from 0
    first_position = getattr(getattr(base, "embeddings", None), "padding_idx", -1) + 1
    try:
        order = sorted(range(len(texts)), key=token_lengths(tokenizer, texts, max_length).__getitem__)
        out = torch.empty(0)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
            )
            inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
            if use_positions:
                positions = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
                inputs["position_ids"] = positions + first_position
            hidden = base(**inputs).last_hidden_state[:, -1].float().cpu()
            if out.numel() == 0:
                out = torch.empty(len(texts), hidden.shape[-1])
            out[torch.tensor(idx)] = hidden
        return out
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
