"""Frozen backbones as embedding functions: timm, torchvision and Hugging Face (BERT-style text, ViT, AST audio).

Every builder returns a ``Backbone``: an eval-mode module mapping inputs (n, ...) to embeddings (n, E), plus the
modality and the image preprocessing it expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD
from funai_common.weights import load_state_dict


@dataclass
class Backbone:
    """An embedding model and what it expects. ``modality`` is 'image', 'text' or 'audio'."""

    model: nn.Module
    modality: str = "image"
    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int = 256
    tokenizer: object | None = None
    extra: dict = field(default_factory=dict)


class HFImageEmbedder(nn.Module):
    """Hugging Face vision encoder (ViT, DeiT, DINOv2...) -> CLS token of the last hidden state (pooler unused)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class HFTextEmbedder(nn.Module):
    """Hugging Face text encoder (BERT-style) -> first token of the last hidden state (the pooler is not used)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state[:, 0]


class HFAudioEmbedder(nn.Module):
    """Hugging Face Audio Spectrogram Transformer -> mean of the CLS and distillation tokens (AST's pooling)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_values=input_values).last_hidden_state
        return (hidden[:, 0] + hidden[:, 1]) / 2


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter requires grad (per-sample gradients never need them)."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a local .safetensors or .pth/.pt file (the latter with ``weights_only=True``)."""
    return load_state_dict(path, keys=("model", "state_dict", "teacher"))


def build_timm(name: str, pretrained: bool = True, checkpoint: str | None = None, **kwargs) -> Backbone:
    """timm model by name (``num_classes=0`` -> pooled CLS embedding); optional local checkpoint."""
    import timm

    model = timm.create_model(name, pretrained=pretrained and checkpoint is None, num_classes=0, **kwargs)
    if checkpoint:
        missing, _ = model.load_state_dict(load_state_dict_file(checkpoint), strict=False)
        if missing:
            raise ValueError(f"checkpoint {checkpoint} misses {len(missing)} weights of {name}, e.g. {missing[:3]}")
    cfg = model.pretrained_cfg or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct", 0.875) or 0.875)
    return Backbone(
        freeze(model),
        input_size=size,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        resize_size=int(round(size / crop_pct)),
    )


def build_torchvision(name: str, pretrained: bool = True, **kwargs) -> Backbone:
    """torchvision ViT (``vit_b_16``...) with the classification head removed -> CLS embedding."""
    import torchvision

    model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    model.heads = nn.Identity()
    return Backbone(freeze(model), input_size=model.image_size)


def build_hf(name: str, modality: str | None = None, **kwargs) -> Backbone:
    """Hugging Face model id or local folder; modality inferred from the config (text, image or audio)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name)
    modality = modality or hf_modality(config)
    model = AutoModel.from_pretrained(name, **kwargs)
    return wrap_hf(model, modality, name)


def hf_modality(config) -> str:
    """'audio' for AST, 'image' for configs with an image size, else 'text'."""
    if config.model_type == "audio-spectrogram-transformer":
        return "audio"
    return "image" if hasattr(config, "image_size") else "text"


def wrap_hf(model: nn.Module, modality: str, tokenizer_name: str | None = None) -> Backbone:
    """Wrap an instantiated transformers model (e.g. built from a small config in tests) as a Backbone."""
    if modality == "text":
        tokenizer = None
        if tokenizer_name is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        return Backbone(freeze(HFTextEmbedder(model)), modality="text", tokenizer=tokenizer)
    if modality == "audio":
        return Backbone(freeze(HFAudioEmbedder(model)), modality="audio")
    size = model.config.image_size
    size = size if isinstance(size, int) else size[0]
    return Backbone(freeze(HFImageEmbedder(model)), input_size=size, resize_size=int(round(size / 0.875)))


def build_backbone(name: str, pretrained: bool = True, checkpoint: str | None = None, **kwargs) -> Backbone:
    """Backbone from ``timm:<name>`` (or a bare timm name), ``torchvision:<name>`` or ``hf:<id or path>``."""
    family, _, model_name = name.partition(":") if ":" in name else ("timm", "", name)
    if family == "timm":
        return build_timm(model_name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    if family == "torchvision":
        return build_torchvision(model_name, pretrained=pretrained, **kwargs)
    if family == "hf":
        return build_hf(model_name, **kwargs)
    raise ValueError(f"unknown model family {family!r} in {name!r}; expected timm:, torchvision: or hf:")
