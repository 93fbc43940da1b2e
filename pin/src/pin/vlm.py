"""Frozen vision-language models with a hook site for the positional insert.

One `FrozenVLM` wraps a transformers (or OpenFlamingo) model, its tokenizer and the facts PIN needs: where the vision
tokens leave the encoder, how many there are, the media placeholder tokens, the end token and the pixel normalisation.
  - BLIP-2 (default, `Salesforce/blip2-opt-2.7b`): output of `vision_model` (`last_hidden_state`, after the post
    layernorm, CLS included: 257 x 1408 at 224 px), i.e. LAVIS's ln_vision(visual_encoder(x)).
  - LLaVA and PaliGemma: input of `multi_modal_projector` (the selected vision features before fusion).
  - OpenFlamingo (optional `open_flamingo` package): input of the Perceiver resampler, (B, T, F, 256, 1024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .model import PositionalInsert

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
IMAGE_TOKEN = "<image>"


@dataclass
class FrozenVLM:
    """A frozen VLM plus what PIN needs to know about it (see module docstring)."""

    model: nn.Module
    tokenizer: object
    kind: str
    image_size: int
    num_vision_tokens: int
    vision_dim: int
    image_token_id: int | None
    num_image_tokens: int
    end_token: str
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    image_after_bos: bool = False
    interpolate_pos_encoding: bool = False  # BLIP-2 at another resolution than its checkpoint (e.g. 364 px)
    handles: list = field(default_factory=list)

    # ---- freezing and hooks -------------------------------------------------------------------------------------
    def freeze(self) -> FrozenVLM:
        """requires_grad=False on every VLM parameter and eval mode (no dropout)."""
        self.model.requires_grad_(False)
        self.model.eval()
        return self

    def vision_site(self) -> tuple[nn.Module, str]:
        """(module, "output"|"input"): the vision tokens are that module's output or first positional input."""
        m = self.model
        if self.kind == "blip2":
            return m.vision_model, "output"
        if self.kind in ("llava", "paligemma"):
            inner = getattr(m, "model", m)
            return inner.multi_modal_projector, "input"
        if self.kind == "openflamingo":
            return m.perceiver, "input"
        raise ValueError(f"unknown VLM kind {self.kind!r}; expected blip2, llava, paligemma or openflamingo")

    def vision_encoder(self) -> nn.Module:
        """The vision tower (for VPT / LoRA baselines)."""
        m = self.model
        if self.kind == "blip2":
            return m.vision_model
        if self.kind in ("llava", "paligemma"):
            return getattr(m, "model", m).vision_tower
        return m.vision_encoder

    def attach(self, insert: PositionalInsert, no_grad_vision: bool = True) -> None:
        """Add `insert` to the vision tokens at the hook site on every forward (also inside `generate`).

        With `no_grad_vision` the vision tower runs without autograd (the VLM is frozen; only the insert needs grads).
        """
        self.detach()
        module, mode = self.vision_site()
        if no_grad_vision:
            self.set_vision_grad(False)
        if mode == "output":

            def add_to_output(_module, _args, output):
                if isinstance(output, tuple):
                    return (insert.add_to(output[0]),) + tuple(output[1:])
                output.last_hidden_state = insert.add_to(output.last_hidden_state)
                return output

            self.handles.append(module.register_forward_hook(add_to_output))
        else:

            def add_to_input(_module, args):
                return (insert.add_to(args[0]),) + tuple(args[1:])

            self.handles.append(module.register_forward_pre_hook(add_to_input))

    def set_vision_grad(self, enabled: bool) -> None:
        """Run the vision tower with autograd on or off, whatever the caller's mode (OpenFlamingo calls it under
        no_grad, so VPT / LoRA there need it switched on); removed by `detach`."""
        encoder = self.vision_encoder()
        grad_state: list[bool] = []

        def start(_module, _args):
            grad_state.append(torch.is_grad_enabled())
            torch.set_grad_enabled(enabled)

        def end(_module, _args, _output):
            torch.set_grad_enabled(grad_state.pop())

        self.handles.append(encoder.register_forward_pre_hook(start))
        self.handles.append(encoder.register_forward_hook(end))

    def detach(self) -> None:
        """Remove every hook this wrapper installed."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ---- text -----------------------------------------------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        """Sequence ids: media placeholders + tokenizer(text) ids (BOS as the tokenizer adds it)."""
        ids = list(self.tokenizer(text)["input_ids"])
        media = [self.image_token_id] * self.num_image_tokens if self.num_image_tokens else []
        if self.image_after_bos and ids and ids[0] == self.tokenizer.bos_token_id:
            return ids[:1] + media + ids[1:]
        return media + ids

    def text_with_media(self, text: str) -> str:
        """OpenFlamingo writes its media token in the text; the others get placeholder ids in `token_ids`."""
        return f"{IMAGE_TOKEN}{text}" if self.kind == "openflamingo" else text

    def batch(self, texts: Sequence[str], padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        """Pad token id lists to (B, L) ids and attention mask (right for training, left for generation)."""
        seqs = [self.token_ids(self.text_with_media(t)) for t in texts]
        length = max(len(s) for s in seqs)
        pad = self.pad_token_id
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if padding_side == "right" else slice(length - len(s), length)
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
        return ids, mask

    def prefix_length(self, prefix: str) -> int:
        """Token count of a loss-free prefix built exactly like a training sequence (media and BOS included)."""
        return len(self.token_ids(self.text_with_media(prefix)))

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or its EOS id when it has none."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def end_token_id(self) -> int:
        """Id of `end_token`, the token that ends generation."""
        return self.tokenizer.convert_tokens_to_ids(self.end_token)

    # ---- model calls ------------------------------------------------------------------------------------------------
    def _extra(self) -> dict:
        return {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}

    def logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, V) next-token logits aligned with input_ids."""
        if self.kind == "openflamingo":
            out = self.model(vision_x=pixel_values[:, None, None], lang_x=input_ids, attention_mask=attention_mask)
        else:
            out = self.model(
                pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **self._extra()
            )
        logits = out.logits
        return logits[:, -input_ids.shape[1] :]

    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor, prompts: Sequence[str], num_beams: int = 3, max_new_tokens: int = 12
    ) -> list[str]:
        """Beam-search continuations of the prompts; returns prompt + continuation text per image."""
        ids, mask = self.batch(prompts, padding_side="left")
        ids, mask = ids.to(pixel_values.device), mask.to(pixel_values.device)
        kwargs = dict(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.end_token_id,
            pad_token_id=self.pad_token_id,
            do_sample=False,
        )
        if self.kind == "openflamingo":
            out = self.model.generate(vision_x=pixel_values[:, None, None], lang_x=ids, attention_mask=mask, **kwargs)
        else:
            out = self.model.generate(
                pixel_values=pixel_values, input_ids=ids, attention_mask=mask, **kwargs, **self._extra()
            )
        if out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
            out = out[:, ids.shape[1] :]
        # The continuation is decoded after its prompt and the decoded prompt cut off: decoded alone, its first
        # token loses its leading space with sentencepiece tokenizers (Llama / LLaVA strip one), turning the
        # generated " [x1,..." into "[x1,...", which the box pattern (a space before "[") never matches.
        texts = []
        for row, row_mask, new in zip(ids.tolist(), mask.tolist(), out.tolist()):
            prompt_ids = [t for t, m in zip(row, row_mask) if m]
            head = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
            full = self.tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
            texts.append(
                full[len(head) :] if full.startswith(head) else self.tokenizer.decode(new, skip_special_tokens=True)
            )
        return [f"{p}{t}" for p, t in zip(prompts, texts)]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised pixel values."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def build_insert(self, table_dim: int = 64, hidden_dims=(512, 768), learned_table: bool = False):
        """A PositionalInsert shaped for this VLM's vision tokens."""
        return PositionalInsert(self.num_vision_tokens, self.vision_dim, table_dim, tuple(hidden_dims), learned_table)
