"""Student/teacher networks: a timm ViT backbone (DINOv2, DINOv2 with registers, DINO) + NeCo's MLP head."""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from funai_common.vit import use_dino_interpolation
from funai_common.weights import create_timm_model, fit_to_timm_vit, load_state_dict, strip_prefixes_from

log = logging.getLogger(__name__)

# Released backbones of spec section 6 (timm names). "R-XR": registers dropped from DINOv2R weights.
BACKBONES = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2r_vits14": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2r_vitb14": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dino_vits16": "vit_small_patch16_224.dino",
}
PREFIXES = ("module.", "model.", "teacher.", "student.", "backbone.")
STUDENT_PREFIXES = ("model.", "student.")  # Lightning / NeCo names of the student next to a "teacher."
_BLOCK = re.compile(r"blocks\.(\d+)\.")  # timm transformer block parameters: blocks.<i>.*


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pth/.ckpt loaded with ``weights_only=True`` (never unpickled),
    without wrapper prefixes (Lightning ``model.``/``teacher.``, DDP ``module.``, ``backbone.``).

    A reference Lightning ``.ckpt`` holds the student under ``model.`` and the EMA teacher under ``teacher.``; the
    student is kept, as in the reference evaluation (``method: ours``) and NeCo's own ``student.safetensors``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} does not exist; download the weights and set model.checkpoint=/path/to/weights "
            f"(.safetensors, .pth or a NeCo checkpoint directory)"
        )
    if os.path.isdir(path):
        path = os.path.join(path, "student.safetensors")
    state = load_state_dict(path, keys=("state_dict", "model", "teacher"), strip_prefixes=("module.",))
    for student in STUDENT_PREFIXES:
        if any(k.startswith(student) for k in state) and any(k.startswith("teacher.") for k in state):
            state = {k: v for k, v in state.items() if k.startswith(student)}
            break
    return strip_prefixes_from(state, PREFIXES)


def _load_checkpoint(model: nn.Module, name: str, path: str, drop_registers: bool) -> None:
    """Load a backbone checkpoint (timm, DINOv2 torch.hub or NeCo layout) into the timm ``model`` called ``name``."""
    state = load_state_file(path)
    # hub -> timm: register_tokens -> reg_token, cls position folded into cls_token (also without registers, the
    # reference's R-XR runs), mask_token dropped, w12/w3
    # renamed, pos_embed resampled to the model's grid; another patch size is an error
    state = fit_to_timm_vit(state, model)
    if drop_registers:
        state.pop("reg_token", None)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    if not state:
        raise ValueError(f"checkpoint {path!r} holds no weights matching timm model {name!r}")
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"checkpoint {path!r} does not fit timm model {name!r}: {', '.join(wrong)}")
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        log.warning("backbone keys missing from %s: %s", path, missing)


def build_backbone(cfg: dict[str, Any], drop_path: float | None = None) -> nn.Module:
    """timm ViT from ``cfg`` (``model`` section): name, pretrained, checkpoint, drop_registers, timm overrides.

    ``dynamic_img_size`` lets one network take the 518 px global and 98 px local crops, with the position table
    interpolated as the DINO / DINOv2 code does (bicubic, +0.1 offset, no antialias: ``use_dino_interpolation``).
    ``drop_registers`` builds the "R-XR" variant: DINOv2R weights without register tokens.
    """
    name = BACKBONES.get(cfg["name"], cfg["name"])
    kwargs = dict(
        num_classes=0, dynamic_img_size=True, drop_path_rate=cfg["drop_path"] if drop_path is None else drop_path
    )
    kwargs.update(cfg.get("overrides") or {})
    if cfg.get("drop_registers"):
        kwargs["reg_tokens"] = 0
    pretrained = bool(cfg.get("pretrained")) and not cfg.get("checkpoint")
    label = f"model.name={cfg['name']} (timm {name})"
    hint = "download them once on a machine online (they are cached), or set model.checkpoint=PATH to local weights"
    try:
        if pretrained and cfg.get("drop_registers"):
            model = create_timm_model(name, False, label, hint, **kwargs)
            source = create_timm_model(name, True, label, hint, num_classes=0, dynamic_img_size=True).state_dict()
            source.pop("reg_token", None)
            model.load_state_dict(source, strict=True)
        else:
            model = create_timm_model(name, pretrained, label, hint, **kwargs)
    except TypeError as err:  # a model.overrides key the model's constructor does not take (a misspelt one)
        raise ValueError(f"model.overrides={cfg.get('overrides')} do not fit {label}: {err}") from None
    if cfg.get("checkpoint"):
        _load_checkpoint(model, name, cfg["checkpoint"], bool(cfg.get("drop_registers")))
    return use_dino_interpolation(model)


class ProjectionHead(nn.Module):
    """Linear(D, h) -> GELU -> ... -> Linear(h, out), L2-normalised output (no BatchNorm), as in the reference."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


def _whole_patches(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images`` cropped top-left to a multiple of the backbone's patch size."""
    ph, pw = backbone.patch_embed.patch_size
    return images[..., : images.shape[-2] // ph * ph, : images.shape[-1] // pw * pw]


def patch_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Final-norm patch tokens (B, floor(H/p) * floor(W/p), D) of a timm ViT, CLS and register tokens dropped.

    Images are cropped top-left to a multiple of the patch size p, which is what the reference's stride-p patch
    convolution sees (98 px crops with p = 16 give 6 x 6 tokens); timm's dynamic-size patch embedding would
    otherwise reject them.
    """
    return backbone.forward_features(_whole_patches(backbone, images))[:, backbone.num_prefix_tokens :]


@torch.no_grad()
def cls_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (B, T) of the first (CLS) token to all T tokens in the timm ``block`` given its input
    x (B, T, D), averaged over heads; float32 with autocast off, no gradient."""
    attn = block.attn
    b, t, _ = x.shape
    with torch.autocast(x.device.type, enabled=False):
        qkv = attn.qkv(block.norm1(x.float())).reshape(b, t, 3, attn.num_heads, attn.head_dim)
        q = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))  # (B, h, 1, d)
        k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, h, T, d)
        weights = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)
    return weights[:, :, 0].mean(1)


def tokens_and_attention(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``patch_tokens`` and the last block's head-averaged CLS-to-patch attention (B, N) (register columns dropped;
    the softmax runs over all tokens), the reference's ``last_self_attention``."""
    inputs: list[torch.Tensor] = []
    last = backbone.blocks[-1]
    handle = last.register_forward_pre_hook(lambda _module, args: inputs.append(args[0]))
    try:
        tokens = backbone.forward_features(_whole_patches(backbone, images))
    finally:
        handle.remove()
    prefix = backbone.num_prefix_tokens
    return tokens[:, prefix:], cls_attention(last, inputs[0])[:, prefix:]


class NecoNet(nn.Module):
    """Backbone + head; ``forward(crops)`` maps a list of (B, 3, s, s) crops to a list of (B, N_s, out_dim)."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor], attention: bool = False):
        """Head outputs per crop; with ``attention`` also each crop's CLS attention (B, N) (``tokens_and_attention``)
        as a second list."""
        outputs: list[torch.Tensor | None] = [None] * len(crops)
        attentions: list[torch.Tensor | None] = [None] * len(crops)
        # one backbone call per resolution, crop-major (all images of crop 0, then crop 1, ...)
        for size in dict.fromkeys(c.shape[-1] for c in crops):
            idx = [i for i, c in enumerate(crops) if c.shape[-1] == size]
            images = torch.cat([crops[i] for i in idx])
            if attention:
                tokens, attn = tokens_and_attention(self.backbone, images)
                for i, chunk in zip(idx, attn.chunk(len(idx))):
                    attentions[i] = chunk
            else:
                tokens = patch_tokens(self.backbone, images)
            for i, chunk in zip(idx, self.head(tokens).chunk(len(idx))):
                outputs[i] = chunk
        return (outputs, attentions) if attention else outputs


def build_student_teacher(cfg: dict[str, Any]) -> tuple[NecoNet, NecoNet]:
    """Student (drop_path from cfg) and teacher (identical weights, drop_path 0, no gradients)."""
    backbone = build_backbone(cfg)
    head = ProjectionHead(backbone.num_features, cfg["head_hidden_dim"], cfg["head_out_dim"], cfg["head_layers"])
    student = NecoNet(backbone, head)
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    teacher.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s over all parameters, head included.

    Parameters frozen in the student (``optim.trainable_blocks``) are skipped: teacher and student hold the same
    values there, and m * theta + (1 - m) * theta is not theta in floating point (the reference's update moves
    frozen teacher weights by rounding, ~1 ulp per step)."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        if p_s.requires_grad:
            p_t.mul_(momentum).add_(p_s.detach().to(p_t.dtype), alpha=1.0 - momentum)


def freeze_blocks(backbone: nn.Module, trainable_blocks: int | Sequence[int] | None) -> list[int]:
    """Leave only the chosen transformer blocks of ``backbone`` trainable (the reference's ``trainable_blocks``).

    None trains everything; an int n keeps ``sorted(block ids)[n:]`` (-2: the last two blocks, 3: block 3 onwards); a
    list keeps those ids. Once blocks are chosen, the backbone's parameters outside ``blocks.<i>.`` (patch embedding,
    tokens, position table, final norm) are frozen too, as in the reference. Returns the trainable block ids.
    """
    ids = {name: int(m.group(1)) for name, _ in backbone.named_parameters() if (m := _BLOCK.match(name))}
    all_ids = sorted(set(ids.values()))
    if trainable_blocks is None:
        return all_ids
    if isinstance(trainable_blocks, int):
        keep = all_ids[trainable_blocks:]
        if not keep:  # an int past the last block would silently freeze the whole backbone
            raise ValueError(
                f"optim.trainable_blocks={trainable_blocks} keeps none of the backbone's blocks {all_ids}; use an int "
                f"below {len(all_ids)} (-2: the last two), or [] to train the head only"
            )
    else:
        if isinstance(trainable_blocks, str) or not all(isinstance(i, int) for i in trainable_blocks):
            raise ValueError(
                f"optim.trainable_blocks={trainable_blocks!r}: expected null, an int or a list of block ids (ints)"
            )
        keep = sorted(set(trainable_blocks))
        unknown = [i for i in keep if i not in all_ids]
        if unknown:
            raise ValueError(f"optim.trainable_blocks names blocks {unknown}; the backbone has blocks {all_ids}")
    for name, p in backbone.named_parameters():
        if ids.get(name) not in keep:
            p.requires_grad_(False)
    return keep


def param_groups(student: NecoNet, lr_backbone: float, lr_head: float, weight_decay: float) -> list[dict[str, Any]]:
    """Four AdamW groups: backbone decay / no-decay, head decay / no-decay (biases and 1-D params: no decay)."""
    groups = []
    for part, lr in ((student.backbone, lr_backbone), (student.head, lr_head)):
        decay, no_decay = [], []
        for name, p in part.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "base_lr": lr, "decay": True})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "base_lr": lr, "decay": False})
    return groups
