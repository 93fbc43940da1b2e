"""Frozen backbones as embedding functions: timm, torchvision and Hugging Face (BERT-style or T5 text, ViT, AST).

Every builder returns a ``Backbone``: an eval-mode module mapping inputs (n, ...) to embeddings (n, E), plus the
modality and the image preprocessing it expects.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD
from funai_common.weights import create_timm_model, fit_to_timm_vit, load_state_dict, weights_unavailable

log = logging.getLogger(__name__)
# PIL resample codes used by Hugging Face image processors -> torchvision interpolation names
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# timm weight tags whose official evaluation transform the reference uses instead of timm's data config: DINO
# (tag 'dino', timm crop_pct 0.9) and DINOv2 (tag 'lvd142m', timm crop_pct 1.0) are resized to 256 and center
# cropped to 224 (the reference's src/models/dino.py and dinov2.py, from DINO's eval_knn.py and DINOv2's
# make_classification_eval_transform): crop_pct 224 / 256
OFFICIAL_CROP_PCT = {"dino": 0.875, "lvd142m": 0.875}


@dataclass
class Backbone:
    """An embedding model and what it expects. ``modality`` is 'image', 'text' or 'audio'.

    Image inference transform: resize to ``resize_size`` (an int resizes the shorter side, an (h, w) pair resizes to
    exactly that size) with ``interpolation``, center crop ``input_size``, normalise with ``mean`` and ``std``.
    """

    model: nn.Module
    modality: str = "image"
    input_size: int | tuple[int, int] = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int | tuple[int, int] = 256
    interpolation: str = "bicubic"
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
    """Hugging Face text encoder -> first token of the last hidden state: BERT's CLS (the pooler is not used), T5's
    first token (after the encoder's final layer norm)."""

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


WEIGHTS_HINT = (
    "download them once on a machine online (they are cached), or use local weights: checkpoint=PATH (timm), "
    "model=hf:/local/folder (Hugging Face), or pretrained=false for random weights (timm, torchvision)"
)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a local .safetensors or .pth/.pt file (the latter with ``weights_only=True``)."""
    return load_state_dict(path, keys=("model", "state_dict", "teacher"))


def resize_for(size: int | tuple[int, int], crop_pct: float = 0.875) -> int | tuple[int, int]:
    """Resize size whose center crop ``crop_pct`` is ``size`` (timm's rule: floor(size / crop_pct) per side)."""
    if isinstance(size, int):
        return math.floor(size / crop_pct)
    return tuple(math.floor(s / crop_pct) for s in size)


def _square(size) -> int | tuple[int, int]:
    """An int for square sizes, else (h, w); accepts an int, [s] or (h, w)."""
    if isinstance(size, int):
        return size
    h, w = (int(size[0]), int(size[-1]))
    return h if h == w else (h, w)


def build_timm(
    name: str, pretrained: bool = True, checkpoint: str | None = None, input_size: int | None = None, **kwargs
) -> Backbone:
    """timm model by name (``num_classes=0`` -> pooled CLS embedding, unless ``num_classes`` is given); optional local
    checkpoint.

    The transform runs the model at its built ``img_size``, or at ``input_size`` when given, with timm's data config
    (mean, std, interpolation, crop_pct), except the crop_pct of DINO and DINOv2 weights (``OFFICIAL_CROP_PCT``:
    resize 256, crop 224 as their official evaluation and the reference, where timm would resize to 248 or 224).
    A ViT built with ``dynamic_img_size=True`` keeps its stored position table and interpolates it for other sizes as
    the official DINO / DINOv2 code does (``use_dino_interpolation``): e.g. DINOv2's 518 px table at 224 px, as
    torch.hub's model.
    Other dynamic models (ViT subclasses such as distilled DeiT, non-square tables) keep timm's own resampling.
    """
    import timm

    from funai_common.vit import supports_dino_interpolation, use_dino_interpolation

    kwargs = {"num_classes": 0, **kwargs}  # model_kwargs={num_classes: 512} keeps CLIP's image projection
    try:
        model = create_timm_model(name, pretrained and checkpoint is None, f"model=timm:{name}", WEIGHTS_HINT, **kwargs)
    except TypeError as err:  # a model_kwargs key the model's constructor does not take (a misspelt one)
        raise ValueError(f"model_kwargs={kwargs} do not fit model=timm:{name}: {err}") from None
    if checkpoint:
        missing, _ = model.load_state_dict(fit_to_timm_vit(load_state_dict_file(checkpoint), model), strict=False)
        if missing:
            raise ValueError(f"checkpoint {checkpoint} misses {len(missing)} weights of {name}, e.g. {missing[:3]}")
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    if supports_dino_interpolation(model):
        use_dino_interpolation(model)
    cfg = timm.data.resolve_model_data_config(model)
    # the data config keeps the pretrained input size; an img_size= override only shows on the built model
    patch_embed = getattr(model, "patch_embed", None)
    built = _square(getattr(patch_embed, "img_size", None) or cfg["input_size"][1:])
    if input_size and _square(input_size) != built and not dynamic:
        raise ValueError(
            f"input_size={input_size} differs from {name}'s built size {built}: build it with "
            "model_kwargs={dynamic_img_size: true} (or img_size)"
        )
    size = _square(input_size) if input_size else built
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    crop_pct = OFFICIAL_CROP_PCT.get(tag) or float(cfg.get("crop_pct") or 0.875)
    return Backbone(
        freeze(model),
        input_size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        resize_size=resize_for(size, crop_pct),
        interpolation=cfg.get("interpolation") or "bicubic",
    )


def build_torchvision(name: str, pretrained: bool = True, weights: str | None = None, **kwargs) -> Backbone:
    """torchvision ViT (``vit_b_16``...) with the classification head removed -> CLS embedding.

    ``weights``: a weights enum name (default ``DEFAULT`` when ``pretrained``); the inference transform (resize, crop,
    interpolation, normalisation) is that of those weights. Without weights: resize floor(S / 0.875), bilinear, crop S.
    """
    import torchvision

    weights = weights or ("DEFAULT" if pretrained else None)
    weights = torchvision.models.get_model_weights(name).verify(weights) if weights else None
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except OSError as err:
        if weights is None:
            raise
        raise weights_unavailable(f"model=torchvision:{name}", err, WEIGHTS_HINT) from err
    model.heads = nn.Identity()
    return torchvision_backbone(freeze(model), weights)


def torchvision_backbone(model: nn.Module, weights=None) -> Backbone:
    """Backbone for a torchvision ViT with the inference transform of ``weights`` (a weights enum or None)."""
    size = model.image_size
    if weights is None:
        return Backbone(model, input_size=size, resize_size=resize_for(size), interpolation="bilinear")
    t = weights.transforms()
    crop = _square(t.crop_size)
    if crop != size:
        raise ValueError(f"weights {weights} expect {crop} px inputs but the model is built for {size} px")
    return Backbone(
        model,
        input_size=size,
        mean=tuple(t.mean),
        std=tuple(t.std),
        resize_size=_square(t.resize_size),
        interpolation=t.interpolation.value,
    )


def build_hf(name: str, modality: str | None = None, **kwargs) -> Backbone:
    """Hugging Face model id or local folder; modality inferred from the config (text, image or audio). Text models
    load as their encoder (``AutoModelForTextEncoding``: T5 -> ``T5EncoderModel``, BERT -> ``BertModel``)."""
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name)
        modality = modality or hf_modality(config)
        encoder = modality == "text" and config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES
        model = (AutoModelForTextEncoding if encoder else AutoModel).from_pretrained(name, **kwargs)
    except OSError as err:
        raise weights_unavailable(f"model=hf:{name}", err, WEIGHTS_HINT) from err
    return wrap_hf(model, modality, name)


def hf_image_transform(processor) -> dict:
    """Backbone transform fields (input_size, resize_size, mean, std, interpolation) of a Hugging Face image
    processor: {'shortest_edge': R} + crop -> resize R then crop; {'height', 'width'} without crop -> direct resize."""
    size = processor.size  # a dict or transformers' SizeDict (both have .get)
    if size.get("height") and size.get("width"):
        resize = (int(size["height"]), int(size["width"]))
    elif size.get("shortest_edge"):
        resize = int(size["shortest_edge"])
    else:
        raise ValueError(f"unsupported image processor size {processor.size!r}: expected height/width or shortest_edge")
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        crop = _square((crop["height"], crop["width"]))
    elif isinstance(resize, tuple):
        crop = _square(resize)
    else:
        raise ValueError(f"image processor resizes the shorter side to {resize} without a crop: inputs vary in size")
    resample = getattr(processor, "resample", 3)
    return {
        "input_size": crop,
        "resize_size": resize,
        "mean": tuple(float(m) for m in processor.image_mean),
        "std": tuple(float(s) for s in processor.image_std),
        "interpolation": PIL_RESAMPLE.get(int(resample), "bicubic"),
    }


def hf_modality(config) -> str:
    """'audio' for AST, 'image' for configs with an image size, else 'text'."""
    if config.model_type == "audio-spectrogram-transformer":
        return "audio"
    return "image" if hasattr(config, "image_size") else "text"


def wrap_hf(model: nn.Module, modality: str, name: str | None = None) -> Backbone:
    """Wrap an instantiated transformers model (e.g. built from a small config in tests) as a Backbone.

    ``name`` (hub id or folder) supplies the tokenizer (text) or the image processor whose resize, crop, mean and std
    become the inference transform (image); without it images get resize floor(S / 0.875), crop S, ImageNet norm.
    Text: an encoder-decoder (``T5Model``) keeps its encoder; the tokenizer pads on the right, so that the first
    token, the feature, is never padding.
    """
    if modality == "text":
        tokenizer = None
        if name is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
            tokenizer.padding_side = "right"
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        return Backbone(freeze(HFTextEmbedder(model)), modality="text", tokenizer=tokenizer)
    if modality == "audio":
        return Backbone(freeze(HFAudioEmbedder(model)), modality="audio")
    size = _square(model.config.image_size if isinstance(model.config.image_size, int) else model.config.image_size[:2])
    if name is None:
        return Backbone(freeze(HFImageEmbedder(model)), input_size=size, resize_size=resize_for(size))
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError:
        log.warning("%s has no image processor (preprocessor_config.json): ImageNet mean/std, resize %s, crop %s",
                    name, resize_for(size), size)  # fmt: skip
        return Backbone(freeze(HFImageEmbedder(model)), input_size=size, resize_size=resize_for(size))
    return Backbone(freeze(HFImageEmbedder(model)), **hf_image_transform(processor))


def build_backbone(
    name: str, pretrained: bool = True, checkpoint: str | None = None, input_size: int | None = None, **kwargs
) -> Backbone:
    """Backbone from ``timm:<name>`` (or a bare timm name), ``torchvision:<name>`` or ``hf:<id or path>``;
    ``input_size`` (timm only) runs the model at another size than its built one."""
    family, _, model_name = name.partition(":") if ":" in name else ("timm", "", name)
    if family == "timm":
        return build_timm(model_name, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, **kwargs)
    if input_size:
        raise ValueError(f"input_size={input_size} applies to timm models; {name} takes its size from its weights")
    if family == "torchvision":
        return build_torchvision(model_name, pretrained=pretrained, **kwargs)
    if family == "hf":
        return build_hf(model_name, **kwargs)
    raise ValueError(f"unknown model family {family!r} in {name!r}; expected timm:, torchvision: or hf:")
