"""Backbone (timm ViT), DINO projection head, and access to the last block's attention, queries and keys."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from funai_common.vit import use_dino_interpolation
from funai_common.weights import create_timm_model, load_state_dict


def build_backbone(
    name: str = "vit_small_patch16_224",
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    **overrides: Any,
) -> VisionTransformer:
    """A timm ViT without classifier, accepting any input size that is a multiple of the patch size; at other sizes
    than its own the position table is interpolated as the official DINO ViT does (``use_dino_interpolation``).

    ``overrides`` go to ``timm.create_model`` (tests use e.g. ``img_size=32, patch_size=8, embed_dim=32, depth=2``).
    Pretrained weights that cannot be found (offline, not cached) raise FileNotFoundError naming the model.
    """
    model = create_timm_model(
        name,
        pretrained,
        f"timm backbone {name!r}",
        "download them once (Hugging Face cache) or pass a local checkpoint file instead",
        num_classes=0,
        drop_path_rate=drop_path_rate,
        dynamic_img_size=True,
        **overrides,
    )
    if not isinstance(model, VisionTransformer) or model.num_prefix_tokens != 1:
        raise ValueError(f"{name!r}: DoRA needs a timm VisionTransformer with a CLS token and no registers")
    if not pretrained:  # the DINO / DoRA ViT's init of the CLS token (timm draws it from N(0, 1e-6))
        nn.init.trunc_normal_(model.cls_token, std=0.02)
    return use_dino_interpolation(model)


def forward_with_attention(model: VisionTransformer, images: torch.Tensor):
    """Run a timm ViT and expose the last block's attention.

    Returns (cls (B, D) normed CLS token, tokens (B, N+1, D) all tokens after the final norm, attn (B, h, N+1, N+1)
    last-block softmax attention, query and key (B, h, N+1, D/h) unscaled per-head projections of the last
    block's first LayerNorm output).
    """
    captured: dict[str, torch.Tensor] = {}
    last = model.blocks[-1]

    def hook(_module, args):
        captured["x"] = args[0]

    handle = last.register_forward_pre_hook(hook)
    try:
        tokens = model.forward_features(images)
    finally:
        handle.remove()
    x = captured["x"]
    attn_mod = last.attn
    b, n, c = x.shape
    h = attn_mod.num_heads
    qkv = attn_mod.qkv(last.norm1(x)).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    query, key = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
    attn = torch.softmax((query * attn_mod.scale) @ key.transpose(-2, -1), dim=-1)
    return tokens[:, 0], tokens, attn, query, key


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU), L2 normalisation, weight-normed linear to out_dim.

    The last layer keeps the reference parameter names ``last_layer.weight_g`` / ``last_layer.weight_v``;
    ``norm_last_layer=True`` freezes g at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim if nlayers > 1 else bottleneck_dim)]
        for i in range(nlayers - 1):
            layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim if i == nlayers - 2 else hidden_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (row-wise), g initialised to 1; v has nn.Linear's default
    init (the reference builds this layer after applying its trunc-normal init to the MLP)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's: uniform on +-1/sqrt(in_dim)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DoRANetwork(nn.Module):
    """Backbone + DINO head, evaluated on the CLS token of every frame of every view."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, *views: torch.Tensor):
        """Each view (..., 3, H, W) -> (..., out_dim), leading axes flattened into one batch per view; one call
        for all views so that DDP sees a single forward. Returns one tensor per view (a tensor for one view)."""
        outs = []
        for frames in views:
            lead = frames.shape[:-3]
            out = self.head(self.backbone.forward_features(frames.flatten(0, len(lead) - 1))[:, 0])
            outs.append(out.reshape(*lead, -1))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def forward_teacher(self, frames: torch.Tensor):
        """Teacher pass on the global view (B, T, 3, S, S).

        Returns head outputs (T, B, out), patch tokens (T, B, N, D), attn (T, B, h, N+1, N+1), query, key.
        """
        b, t = frames.shape[:2]
        x = frames.transpose(0, 1).flatten(0, 1)
        cls, tokens, attn, query, key = forward_with_attention(self.backbone, x)
        out = self.head(cls).reshape(t, b, -1)

        def split(a: torch.Tensor) -> torch.Tensor:
            return a.reshape(t, b, *a.shape[1:])

        return out, split(tokens[:, 1:]), split(attn), split(query), split(key)


def build_network(cfg: dict, teacher: bool = False) -> DoRANetwork:
    """Student (drop_path from cfg) or teacher (no drop_path) network from the ``model`` config section.

    ``model.pretrained: true`` starts the backbone from timm's pretrained weights for ``model.arch``.
    """
    m = cfg["model"]
    pretrained = m.get("pretrained", False)
    if not isinstance(pretrained, bool):
        raise ValueError(f"model.pretrained={pretrained!r}: expected true or false (timm weights for model.arch)")
    overrides = dict(m.get("overrides") or {})
    for key in ("drop_path_rate", "pretrained"):  # keys of their own (the teacher has no drop path)
        if key in overrides:
            raise ValueError(f"model.overrides.{key}: set model.{key} instead")
    backbone = build_backbone(
        m["arch"],
        drop_path_rate=0.0 if teacher else m["drop_path_rate"],
        pretrained=pretrained,
        **overrides,
    )
    head = DINOHead(
        backbone.embed_dim,
        out_dim=m["out_dim"],
        hidden_dim=m["head_hidden_dim"],
        bottleneck_dim=m["head_bottleneck_dim"],
        norm_last_layer=m["norm_last_layer"],
    )
    return DoRANetwork(backbone, head)


def read_backbone_state(path: str | Path, key: str = "teacher") -> dict[str, torch.Tensor]:
    """Backbone weights from a DoRA run checkpoint directory / safetensors file, or a legacy DoRA/DINO ``.pth``.

    Legacy files are read with ``torch.load(weights_only=True)`` (never unpickled); the ``key`` entry (``teacher``
    for the released DoRA checkpoints) is used when present, ``module.`` / ``backbone.`` prefixes are stripped and
    head weights dropped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found (expected a run checkpoint dir, .safetensors or .pth)")
    if path.is_dir():
        path = path / f"{key}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a DoRA checkpoint directory?")
    try:
        state = load_state_dict(path, keys=(key, "state_dict"), strip_prefixes=("module.", "_orig_mod.", "backbone."))
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: not a checkpoint of plain tensors (not a PyTorch file, e.g. a download's HTML page, or one "
            "holding other Python objects, which are never unpickled)"
        ) from None
    return {k: v for k, v in state.items() if not k.startswith(("head.", "mlp.", "last_layer."))}


def check_shapes(module: nn.Module, state: dict[str, torch.Tensor], what: str, hint: str) -> None:
    """ValueError ``what (n shape mismatches ...): hint`` when weights of ``state`` differ in shape from ``module``'s
    (a checkpoint of another model size)."""
    own = module.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"{what} ({len(wrong)} shape mismatches, checkpoint vs model, e.g. {wrong[:2]}): {hint}")


def load_backbone(model: VisionTransformer, path: str | Path, key: str = "teacher") -> tuple[list[str], list[str]]:
    """Load backbone weights into a timm ViT (non-strict; returns missing and unexpected keys).

    The official DINO ViT uses the same parameter names as timm. The positional embedding is resampled when the
    checkpoint was trained at another grid size.
    """
    state = read_backbone_state(path, key)
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        grid = int(math.sqrt(model.pos_embed.shape[1] - model.num_prefix_tokens))
        state["pos_embed"] = resample_abs_pos_embed(pe, (grid, grid), num_prefix_tokens=model.num_prefix_tokens)
    hint = "set arch / model_overrides to the run's model.arch / model.overrides"
    check_shapes(model, state, f"{path} does not fit the backbone", hint)
    result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
