"""UnCounTR: frozen DINO ViT (timm) + feature interaction module + density decoder (spec b, "Model")."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from funai_common.vit import dino_interpolate, use_dino_interpolation
from funai_common.weights import create_timm_model

BACKBONES = {
    "vit_b_16": "vit_base_patch16_224.dino",
    "vit_b_8": "vit_base_patch8_224.dino",
    "vit_s_16": "vit_small_patch16_224.dino",
}
"""The reference's backbone names mapped to the timm names of the same DINO weights (ViT-B/16 is the default)."""


class FrozenViT(nn.Module):
    """A timm ViT run without gradients: patch tokens after the final norm and the last block's CLS attention."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.vit.requires_grad_(False)
        self.vit.eval()
        self.embed_dim = vit.embed_dim
        self.num_heads = vit.blocks[-1].attn.num_heads
        patch = vit.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_prefix_tokens = vit.num_prefix_tokens

    def train(self, mode: bool = True) -> FrozenViT:
        """Ignores ``mode``: the frozen backbone always stays in eval mode."""
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def all_tokens(self, images: torch.Tensor, with_attention: bool = False):
        """(B, 3, H, W) -> all tokens after the final norm (B, prefix + h*w, C), and the last block's CLS->patch
        attention (B, heads, h*w) or None."""
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.norm_pre(vit.patch_drop(x))
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        attention = self.cls_attention(last, x) if with_attention else None
        return vit.norm(last(x)), attention

    def forward(self, images: torch.Tensor, with_attention: bool = False):
        """images (B, 3, H, W) -> patch tokens (B, h*w, C) [, last block's CLS->patch attention (B, heads, h*w)]."""
        x, attention = self.all_tokens(images, with_attention)
        tokens = x[:, self.num_prefix_tokens :]
        return (tokens, attention) if with_attention else tokens

    def cls_features(self, images: torch.Tensor) -> torch.Tensor:
        """CLS token after the final norm (B, C) (the feature DINO's k-NN and the clustering use)."""
        return self.all_tokens(images)[0][:, 0]

    def cls_attention(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the CLS query over all tokens in ``block``, patch columns only (B, heads, N)."""
        attn = block.attn
        batch, num_tokens, _ = x.shape
        y = block.norm1(x)
        qkv = attn.qkv(y).reshape(batch, num_tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        return logits.softmax(dim=-1)[:, :, 0, self.num_prefix_tokens :]


def build_backbone(
    name: str,
    pretrained: bool = True,
    checkpoint_path: str | None = None,
    img_size: int = 224,
    **kwargs,
) -> FrozenViT:
    """Frozen timm ViT by name (``vit_base_patch16_224.dino`` or a reference alias ``vit_b_16``) or local weights.

    ``kwargs`` go to ``timm.create_model`` (e.g. depth=2, embed_dim=48, num_heads=2 for tests). Inputs of any size
    are accepted (``dynamic_img_size``), the position table interpolated as the official DINO ViT does (bicubic,
    +0.1 offset, no antialias: ``use_dino_interpolation``; the 64 px exemplar crops use it). Weights that cannot
    be found (a missing ``checkpoint_path``, or no download offline) raise FileNotFoundError naming the model.
    """
    name = BACKBONES.get(name, name)
    if checkpoint_path and not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"backbone weights checkpoint_path={checkpoint_path} for {name}: no such file")
    extra = {"pretrained_cfg_overlay": {"file": checkpoint_path}} if checkpoint_path else {}
    vit = create_timm_model(
        name,
        pretrained or bool(checkpoint_path),
        f"backbone {name}",
        "download them once (timm / Hugging Face cache) or give a local file with checkpoint_path=/path/to/weights "
        "(model.checkpoint_path in training configs)",
        num_classes=0,
        img_size=img_size,
        dynamic_img_size=True,
        **extra,
        **kwargs,
    )
    return FrozenViT(use_dino_interpolation(vit))


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of the MAE recipe: (grid_h * grid_w, dim), row-major.

    The first half of the channels encodes the column (w) index, the second half the row (h) index; each half is
    [sin(pos * omega), cos(pos * omega)] with omega_i = 1 / 10000^(i / (dim/4)).
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ww, hh = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([encode(ww), encode(hh)], axis=1)).float()


def interpolate_pos_embed(pos: torch.Tensor, grid: int, new_h: int, new_w: int) -> torch.Tensor:
    """Bicubic resampling of a (grid*grid, D) position embedding to (new_h*new_w, D).

    As the reference's DINO-derived ``interpolate_pos_encoding``: scale factors (new + 0.1) / grid, no antialias
    (which samples other source positions than resizing to the size (new_h, new_w))."""
    if (new_h, new_w) == (grid, grid):
        return pos
    if pos.shape[0] != grid * grid:
        raise ValueError(f"position embedding of {pos.shape[0]} rows is not a {grid} x {grid} grid")
    return dino_interpolate(pos[None], (new_h, new_w))[0]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query and key/value inputs (qkv bias on)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q = self.q(x).reshape(batch, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(context).reshape(batch, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class CrossAttentionBlock(nn.Module):
    """x += SelfAttn(LN x); x += CrossAttn(LN x, exemplars); x += MLP(LN x) (exemplar tokens are not normalised)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y)
        x = x + self.cross_attn(self.norm2(x), exemplars)
        return x + self.mlp(self.norm3(x))


class DensityDecoder(nn.Module):
    """Tokens (B, D, h, w) -> density (B, h*P, w*P): log2(P) stages of Conv3x3 + GroupNorm + ReLU + bilinear x2.

    The last stage adds a Conv1x1 to one channel before its upsampling; no output activation.
    """

    def __init__(self, in_dim: int, patch_size: int, width: int = 256, groups: int = 8):
        super().__init__()
        num_stages = int(round(math.log2(patch_size)))
        if 2**num_stages != patch_size:
            raise ValueError(f"the density decoder needs a power-of-two patch size, got {patch_size}")
        stages = []
        for i in range(num_stages):
            layers = [nn.Conv2d(in_dim if i == 0 else width, width, 3, padding=1), nn.GroupNorm(groups, width)]
            layers.append(nn.ReLU(inplace=True))
            if i == num_stages - 1:
                layers.append(nn.Conv2d(width, 1, 1))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return x[:, 0]


class UnCounTR(nn.Module):
    """Reference-based counter: density (B, H, W) of ``images`` (B, 3, H, W) given ``exemplars`` (B, k, 3, e, e)."""

    def __init__(
        self,
        backbone: FrozenViT,
        img_size: int = 224,
        fim_dim: int = 512,
        fim_depth: int = 2,
        fim_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_width: int = 256,
        decoder_groups: int = 8,
    ):
        super().__init__()
        self.backbone = backbone
        self.patch_size = backbone.patch_size
        self.grid = img_size // self.patch_size
        # one projection for image and exemplar tokens: the shared frozen encoder puts both in one feature space
        # (the reference's fim_embed, applied to both when share_encoder is on, its default)
        self.image_proj = nn.Linear(backbone.embed_dim, fim_dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(fim_dim, self.grid), persistent=False)
        self.blocks = nn.ModuleList(CrossAttentionBlock(fim_dim, fim_heads, mlp_ratio) for _ in range(fim_depth))
        self.norm = nn.LayerNorm(fim_dim)
        self.decoder = DensityDecoder(fim_dim, self.patch_size, decoder_width, decoder_groups)
        for name, module in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def exemplar_tokens(self, exemplars: torch.Tensor) -> torch.Tensor:
        """(B, k, 3, e, e) crops -> (B, k, C): patch features weighted by the head-averaged CLS attention, summed."""
        batch, shots = exemplars.shape[:2]
        tokens, attention = self.backbone(exemplars.flatten(0, 1), with_attention=True)
        pooled = (tokens * attention.mean(dim=1, keepdim=True).transpose(1, 2)).sum(dim=1)
        return pooled.reshape(batch, shots, -1)

    def forward_head(self, tokens: torch.Tensor, exemplar_tokens: torch.Tensor, grid_hw: tuple[int, int]):
        """Image tokens (B, h*w, C) + exemplar tokens (B, k, C) -> density (B, h*P, w*P)."""
        h, w = grid_hw
        x = self.image_proj(tokens) + interpolate_pos_embed(self.pos_embed, self.grid, h, w).to(tokens.dtype)
        y = self.image_proj(exemplar_tokens)
        for block in self.blocks:
            x = block(x, y)
        x = self.norm(x)
        return self.decoder(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))

    def forward(self, images: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
        if exemplars.dim() == 4:
            exemplars = exemplars[:, None]
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        tokens = self.backbone(images)
        return self.forward_head(tokens.float(), self.exemplar_tokens(exemplars).float(), (h, w))


def build_model(model_cfg: dict) -> UnCounTR:
    """UnCounTR from the ``model`` section of a config."""
    backbone = build_backbone(
        model_cfg["backbone"],
        pretrained=model_cfg.get("pretrained", True),
        checkpoint_path=model_cfg.get("checkpoint_path"),
        img_size=model_cfg["img_size"],
        **(model_cfg.get("backbone_kwargs") or {}),
    )
    return UnCounTR(
        backbone,
        img_size=model_cfg["img_size"],
        fim_dim=model_cfg["fim_dim"],
        fim_depth=model_cfg["fim_depth"],
        fim_heads=model_cfg["fim_heads"],
        mlp_ratio=model_cfg.get("mlp_ratio", 4.0),
        decoder_width=model_cfg["decoder_width"],
        decoder_groups=model_cfg["decoder_groups"],
    )
