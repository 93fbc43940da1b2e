"""What gets trained on the frozen VLM: PIN (default), VPT-shallow or LoRA on the vision encoder (baselines).

A `Method` owns the trainable tensors, attaches them to a FrozenVLM and exposes a state dict for checkpoints
(for PIN exactly {"mlp.*", "pos_enc"}, the reference's {'mlp', 'pos_enc'}).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .vlm import FrozenVLM

METHODS = ("pin", "vpt", "lora", "raw")


class VisualPromptTokens(nn.Module):
    """VPT-shallow: `num_tokens` learned tokens inserted after CLS at the vision encoder's input.

    The tokens are not removed at the output, so the fusion module sees 1 + num_tokens + N tokens (as the reference).
    Init uniform +-sqrt(6 / (3 * p * p + D)), p the patch size.
    """

    def __init__(self, num_tokens: int, dim: int, patch_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + dim))
        self.prompts = nn.Parameter(torch.empty(1, num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def insert(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) -> (B, 1 + T + N, D)."""
        prompts = self.dropout(self.prompts.expand(embeddings.shape[0], -1, -1)).to(embeddings.dtype)
        return torch.cat([embeddings[:, :1], prompts, embeddings[:, 1:]], dim=1)


class Method:
    """Trainable part attached to a frozen VLM. kind: pin | vpt | lora | raw (nothing trained)."""

    def __init__(self, vlm: FrozenVLM, kind: str = "pin", cfg: dict | None = None) -> None:
        if kind not in METHODS:
            raise ValueError(f"unknown method {kind!r}; expected one of {METHODS}")
        cfg = cfg or {}
        self.vlm, self.kind = vlm, kind
        self.module: nn.Module | None = None
        self._handles: list = []
        if kind == "pin":
            c = cfg.get("pin", {})
            self.module = vlm.build_insert(
                c.get("table_dim", 64), c.get("hidden_dims", (512, 768)), c.get("learned_table", False)
            )
            vlm.attach(self.module, no_grad_vision=True)
        elif kind == "vpt":
            self._attach_vpt(cfg.get("vpt", {}))
        elif kind == "lora":
            self._attach_lora(cfg.get("lora", {}))

    def _attach_vpt(self, c: dict) -> None:
        if self.vlm.kind not in ("blip2", "openflamingo"):
            raise ValueError(
                "VPT changes the number of vision tokens; supported for BLIP-2 (Q-Former) and OpenFlamingo "
                f"(Perceiver) only, not {self.vlm.kind!r}"
            )
        vision = self.vlm.vision_encoder()
        if self.vlm.kind == "blip2":
            vcfg = self.vlm.model.config.vision_config
            site, width, patch = vision.embeddings, vcfg.hidden_size, vcfg.patch_size
        else:
            if not hasattr(vision, "ln_pre"):
                raise ValueError("VPT on OpenFlamingo needs open_clip's VisionTransformer (conv1, ln_pre) as encoder")
            # open_clip ViT: [CLS, patches] leave ln_pre batch-first; the Perceiver takes any token count
            site, width, patch = vision.ln_pre, vision.conv1.out_channels, vision.conv1.kernel_size[0]
            self.vlm.set_vision_grad(True)
        self.module = VisualPromptTokens(c.get("num_tokens", 20), width, patch, c.get("dropout", 0.1))
        self._handles.append(site.register_forward_hook(lambda _m, _a, out: self.module.insert(out)))

    def _attach_lora(self, c: dict) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as err:
            raise ImportError("method=lora needs peft: pip install 'funai-pin[lora]'") from err
        targets = c.get("target_modules") or _lora_targets(self.vlm)
        targets = [targets] if isinstance(targets, str) else list(targets)  # lora.target_modules=qkv: one name
        config = LoraConfig(
            r=c.get("r", 8),
            lora_alpha=c.get("alpha", 16),
            lora_dropout=c.get("dropout", 0.1),
            target_modules=targets,
        )
        vision = self.vlm.vision_encoder()
        try:
            inject_adapter_in_model(config, vision)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(f"lora.target_modules={c.get('target_modules')!r}: {err}") from err
        if self.vlm.kind == "openflamingo":
            self.vlm.set_vision_grad(True)
        for name, p in vision.named_parameters():
            p.requires_grad_("lora_" in name)
        self.module = nn.ModuleDict({"vision": vision})

    def parameters(self) -> list[nn.Parameter]:
        """The tensors the optimiser updates (nothing from the VLM except LoRA adapters)."""
        if self.module is None:
            return []
        return [p for p in self.module.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the method's tensors (PIN: mlp.* and pos_enc; LoRA: the lora_* weights)."""
        if self.module is None:
            return {}
        state = self.module.state_dict()
        if self.kind == "lora":
            state = {k: v for k, v in state.items() if "lora_" in k}
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
        """Load the method's tensors; a tensor of another shape (a checkpoint of another VLM, image size or PIN
        width) is a ValueError naming `source` and both shapes, missing or unexpected names (another method's
        checkpoint) a KeyError naming `source` (LoRA: only its lora_* tensors are required)."""
        if self.module is None:
            return
        own = self.module.state_dict()
        wrong = [
            f"{k} {tuple(v.shape)} (here {tuple(own[k].shape)})"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if wrong:
            raise ValueError(
                f"{source} does not fit method {self.kind} on this VLM: {', '.join(wrong[:3])}; a checkpoint holds "
                "one backbone's token count and width (PINs/PIN_OF.pt: OpenFlamingo, 256 x 1024 at 224 px)"
            )
        missing = [k for k in own if k not in state and (self.kind != "lora" or "lora_" in k)]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise KeyError(
                f"{source} does not match method {self.kind}: missing {missing[:5]} ({len(missing)}), unexpected "
                f"{unexpected[:5]} ({len(unexpected)})"
            )
        self.module.load_state_dict(state, strict=self.kind != "lora")

    def train(self, mode: bool = True) -> None:
        """Dropout of VPT / LoRA follows `mode`; the VLM itself stays in eval mode."""
        if self.module is None:
            return
        for name, m in self.module.named_modules():
            if isinstance(m, nn.Dropout) and (self.kind == "vpt" or "lora_dropout" in name):
                m.train(mode)

    def to(self, device) -> Method:
        """Move the method's own tensors (not the VLM) to `device`; returns self."""
        if self.module is not None:
            self.module.to(device)
        return self


def _lora_targets(vlm: FrozenVLM) -> tuple[str, ...]:
    """Attention and MLP projections of the vision tower.

    OpenFlamingo: the reference swaps open_clip's nn.MultiheadAttention for a qkv/proj module and targets
    c_fc/qkv/c_proj/proj; here peft wraps the nn.MultiheadAttention `attn` itself (adapters on in_proj and out_proj,
    the same shapes as qkv and proj). Targeting `out_proj` alone would do nothing: the attention reads its weight
    directly instead of calling the module.
    """
    if vlm.kind == "blip2":
        return ("qkv", "projection", "fc1", "fc2")
    if vlm.kind == "openflamingo":
        return ("attn", "c_fc", "c_proj")
    return ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
