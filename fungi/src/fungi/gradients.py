"""Batched per-sample gradients of one linear layer, with the frozen prefix of the network run without autograd.

For a linear layer y = x W^T + b applied to every token, the gradient of a per-sample loss L_b is
dL_b/dW = sum_{v,t} G[b,v,t]^T A[b,v,t] and dL_b/db = sum_{v,t} G[b,v,t], with A the layer input and G = dL/dy
(no db for a layer without bias, such as T5's attention output projection).
Because samples never interact (eval-mode model, per-sample losses), one backward of sum_b L_b yields every G at once.
Everything before the layer runs under ``torch.no_grad``: autograd starts at the layer's output, so the backward only
walks through the few modules after it.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Default target layer, per model family: the attention output projection of the last block.
LAYER_SUFFIXES = (
    ".attn.proj",  # timm ViT, DeiT, DINO, DINOv2, CLIP, EVA, MAE
    ".self_attention.out_proj",  # torchvision VisionTransformer (nn.MultiheadAttention)
    ".attention.output.dense",  # Hugging Face BERT, RoBERTa (and ViT, AST in transformers 4.x)
    ".attention.o_proj",  # Hugging Face ViT, AST in transformers 5.x
    ".self_attn.out_proj",  # Hugging Face CLIP / wav2vec-style encoders
    ".SelfAttention.o",  # Hugging Face T5 encoder (no bias)
)

Views = torch.Tensor | Mapping[str, torch.Tensor]


def default_layer(model: nn.Module) -> str:
    """Dotted name of the last block's attention output projection of ``model`` (timm, torchvision, HF)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(LAYER_SUFFIXES)]
    if not names:
        raise ValueError(
            f"could not find an attention output projection (names ending in {LAYER_SUFFIXES}) in "
            f"{type(model).__name__}; pass layer=<dotted name of an nn.Linear> explicitly"
        )
    return names[-1]


def get_linear(model: nn.Module, layer: str) -> nn.Linear:
    """The ``nn.Linear`` called ``layer`` inside ``model`` (clear error otherwise)."""
    try:
        module = model.get_submodule(layer)
    except AttributeError as err:
        raise ValueError(f"layer {layer!r} not found in {type(model).__name__}: {err}") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"layer {layer!r} is a {type(module).__name__}, expected torch.nn.Linear")
    return module


def gradient_shape(linear: nn.Linear) -> tuple[int, int]:
    """Per-sample gradient shape of ``linear``: (O, I + 1) with the bias as last column, (O, I) without a bias."""
    return linear.out_features, linear.in_features + (linear.bias is not None)


def _mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
    """nn.MultiheadAttention self-attention that calls ``self.out_proj`` as a module (so its hooks fire)."""
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, length, dim = query.shape
    heads = self.num_heads
    if self._qkv_same_embed_dim:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
    b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    q, k, v = (t.reshape(n, t.shape[1], heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype != torch.bool else ~attn_mask
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        pad = ~pad if pad.dtype == torch.bool else pad
        mask = pad if mask is None else (mask & pad if mask.dtype == torch.bool else mask + pad)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
    out = self.out_proj(ctx.transpose(1, 2).reshape(n, length, dim))
    if not self.batch_first:
        out = out.transpose(0, 1)
    return out, None


@contextlib.contextmanager
def module_call_guard(model: nn.Module, linear: nn.Linear) -> Iterator[None]:
    """Make sure ``linear.forward`` is actually called: nn.MultiheadAttention uses ``out_proj.weight`` directly,
    so the parent MHA is temporarily given a forward that calls its ``out_proj`` module."""
    parents = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m.out_proj is linear]
    for mha in parents:
        mha.forward = types.MethodType(_mha_forward, mha)
    try:
        yield
    finally:
        for mha in parents:
            del mha.forward


def _flatten_views(views: Views) -> tuple[Views, int, int]:
    if isinstance(views, Mapping):
        first = next(iter(views.values()))
        b, v = first.shape[:2]
        return {k: t.reshape(b * v, *t.shape[2:]) for k, t in views.items()}, b, v
    b, v = views.shape[:2]
    return views.reshape(b * v, *views.shape[2:]), b, v


def call_model(model: nn.Module, inputs: Views) -> torch.Tensor:
    """model(x) for a tensor, model(**x) for a mapping of tensors (tokenised text)."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def layer_io_gradients(
    model: nn.Module, layer: str, inputs: Views, loss_fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input A and output gradient G = d(sum of losses)/dy of linear ``layer`` for one forward of ``model(inputs)``.

    ``loss_fn`` maps the model output to a vector of independent losses. Everything before the layer runs without
    autograd. Returns (A (n, ..., I), G (n, ..., O)) exactly as the layer saw them.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "per-sample gradients need autograd, which torch.inference_mode() disables: "
            "call the extractor outside inference_mode (torch.no_grad() is fine)"
        )
    linear = get_linear(model, layer)
    store: dict[str, torch.Tensor] = {}

    def pre_hook(module, args):
        torch.set_grad_enabled(True)  # autograd starts here; the enclosing no_grad restores the mode on exit

    def fwd_hook(module, args, output):
        if "input" in store:
            raise RuntimeError(f"layer {layer!r} is called more than once per forward; per-sample gradients undefined")
        store["input"] = args[0].detach()
        out = output.detach().requires_grad_(True)
        store["output"] = out
        return out

    handles = [linear.register_forward_pre_hook(pre_hook), linear.register_forward_hook(fwd_hook)]
    try:
        with torch.no_grad(), module_call_guard(model, linear):
            outputs = call_model(model, inputs)
            if "output" not in store:
                raise RuntimeError(f"layer {layer!r} was not called during the forward pass")
            with torch.enable_grad():
                losses = loss_fn(outputs)
            if losses.dim() != 1:
                raise ValueError(f"loss_fn must return per-sample losses (a vector), got shape {tuple(losses.shape)}")
            if not losses.requires_grad:
                raise RuntimeError(f"the model output does not depend on layer {layer!r}")
            (grad_out,) = torch.autograd.grad(losses.sum(), store["output"])
    finally:
        for h in handles:
            h.remove()
    return store["input"], grad_out


def per_sample_gradients(
    model: nn.Module, layer: str, views: Views, loss_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Per-sample gradient of ``loss_fn(embeddings)[b]`` w.r.t. the weight of linear ``layer``: -> (B, O, I+1) float32,
    the bias gradient as last column; (B, O, I) for a layer without bias (T5).

    ``model`` maps inputs (n, ...) to embeddings (n, E); ``views`` is (B, V, C, H, W) (or a mapping of (B, V, ...)
    tensors, passed as keyword arguments); ``loss_fn`` maps embeddings (B, V, E) to per-sample losses (B,) and must not
    mix samples. One batched forward and one backward; the part of the model before ``layer`` runs without autograd.
    """
    flat, batch, num_views = _flatten_views(views)

    def flat_loss(embeddings: torch.Tensor) -> torch.Tensor:
        losses = loss_fn(embeddings.reshape(batch, num_views, -1))
        if losses.shape != (batch,):
            raise ValueError(f"loss_fn must return per-sample losses of shape ({batch},), got {tuple(losses.shape)}")
        return losses

    acts, grad_out = layer_io_gradients(model, layer, flat, flat_loss)
    if acts.shape[0] != batch * num_views:
        raise ValueError(f"layer {layer!r} input is not batch-first: shape {tuple(acts.shape)}, expected dim 0 = n")
    acts = acts.reshape(batch, -1, acts.shape[-1]).float()
    grad_out = grad_out.reshape(batch, -1, grad_out.shape[-1]).float()
    grad_w = torch.bmm(grad_out.transpose(1, 2), acts)  # (B, O, I)
    if get_linear(model, layer).bias is None:
        return grad_w
    grad_b = grad_out.sum(1, keepdim=True).transpose(1, 2)  # (B, O, 1)
    return torch.cat([grad_w, grad_b], dim=2)


def per_sample_gradients_loop(
    model: nn.Module, layer: str, views: Views, loss_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Slow reference: one plain autograd forward+backward per sample (B, O, I+1), or (B, O, I) without bias.
    Used by tests and benchmarks."""
    linear = get_linear(model, layer)
    params = [p for p in (linear.weight, linear.bias) if p is not None]
    flags = [(p, p.requires_grad) for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        batch = (next(iter(views.values())) if isinstance(views, Mapping) else views).shape[0]
        out = []
        for b in range(batch):
            sample = {k: t[b] for k, t in views.items()} if isinstance(views, Mapping) else views[b]
            emb = call_model(model, sample)
            loss = loss_fn(emb.unsqueeze(0))[0]
            grad_w, *grad_b = torch.autograd.grad(loss, params)
            out.append(torch.cat([grad_w, *(g[:, None] for g in grad_b)], dim=1).float())
        return torch.stack(out)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
