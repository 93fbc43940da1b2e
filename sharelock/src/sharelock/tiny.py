"""Tiny randomly initialised backbones and a locally built tokenizer (tests, demo, benchmarks; no downloads)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_word_tokenizer(texts: Iterable[str]):
    """A word-level `PreTrainedTokenizerFast` over the words of `texts` that prepends BOS `<s>` like Llama's
    tokenizer; EOS `</s>`, no pad token (so callers must handle padding as with Llama)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_llama(vocab_size: int, hidden_size: int = 64, layers: int = 2, seed: int = 0, causal_lm: bool = False):
    """A small random `LlamaModel` (or `LlamaForCausalLM`) in float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if causal_lm else LlamaModel)(config)
    return model.eval().requires_grad_(False)


TINY_VIT = "vit_small_patch14_dinov2"


def tiny_vit_spec(img_size: int = 224, embed_dim: int = 48, depth: int = 2, checkpoint: str | None = None) -> dict:
    """Spec for `features.build_vision_encoder`: a DINOv2-style timm ViT (no LayerScale), random weights or a local
    checkpoint."""
    return {
        "model": TINY_VIT,
        "pretrained": False,
        "checkpoint": checkpoint,
        "kwargs": {"img_size": img_size, "embed_dim": embed_dim, "depth": depth, "num_heads": 2, "init_values": None},
    }


@torch.no_grad()
def demo_vit(calibration: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """A tiny random ViT whose CLS features separate simple images: unit-gain Gaussian weights, zero biases, and the
    final LayerNorm bias set so the CLS outputs on `calibration` images (B, 3, 224, 224) have zero mean. (With timm's
    small default init a random ViT's CLS tokens are nearly parallel for all images.)"""
    from sharelock.features import build_vision_encoder

    torch.manual_seed(seed)
    model = build_vision_encoder(tiny_vit_spec())
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            module.weight.normal_(0, module.weight[0].numel() ** -0.5)
            module.bias.zero_()
    model.norm.bias -= model(calibration).mean(0)
    return model


def save_tiny_backbones(out: str | Path, texts: Iterable[str], calibration: torch.Tensor, seed: int = 0):
    """Write the demo ViT (safetensors) and a tiny Llama + word tokenizer (save_pretrained) under `out`; returns the
    (vision spec, language spec) that `sharelock-features` accepts, both loading from local files only."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vit = demo_vit(calibration, seed)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out / "vit.safetensors"))
    tokenizer = build_word_tokenizer(texts)
    llama = build_tiny_llama(len(tokenizer), seed=seed)
    llama.save_pretrained(out / "llama")
    tokenizer.save_pretrained(out / "llama")
    return tiny_vit_spec(checkpoint=str(out / "vit.safetensors")), {"model": str(out / "llama"), "dtype": "float32"}
