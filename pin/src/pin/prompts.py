"""Prompts, training texts and the label masking of the reference.

Training text: "{media}In the image is {a|an} {name} located at [x1,y1,x2,y2] {end}" in the first phase (name,
"located at" and box supervised; note the reference's space before the end text) and "...[x1,y1,x2,y2]{end}" after
the switch (box only). The end text is ".<|endofchunk|>" for OpenFlamingo and the bare end token ("</s>") for the
others, so BLIP-2 texts carry no period (reference text_constructor). The loss-free prefix is
"{media}In the image is {a|an}" (reconstruct) or the whole prompt up to "located at" (box only). Labels: pads, media
tokens and the prefix are -100, then the usual causal shift by one.
The end token ("<|endofchunk|>" for OpenFlamingo, "</s>" for OPT) stays supervised: the reference meant to mask
it but compared ids to a string, so it is in fact trained -- kept here on purpose.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
PROMPT_HEAD = "In the image is"


def article(name: str) -> str:
    """'an' before a vowel-initial name, else 'a' (the reference looks only at the first letter)."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def eval_prompt(name: str) -> str:
    """The text the VLM continues at test time: "In the image is a {name} located at"."""
    return f"{PROMPT_HEAD} {article(name)} {name} located at"


def end_text(kind: str, end_token: str) -> str:
    """What follows the box in a training text: "." + end token for OpenFlamingo, the bare end token otherwise."""
    return f".{end_token}" if kind == "openflamingo" else end_token


def training_text(name: str, box_text: str, end: str, reconstruct: bool) -> str:
    """Full training sentence for one object; `end` from `end_text`. `reconstruct` keeps the reference's space
    before the end text in the first phase ("[..] .<|endofchunk|>", "[..] </s>")."""
    sep = " " if reconstruct else ""
    return f"{eval_prompt(name)} {box_text}{sep}{end}"


def loss_free_prefix(name: str, reconstruct: bool) -> str:
    """The prefix whose tokens get no loss: up to the article (reconstruct) or up to "located at" (box only)."""
    return f"{PROMPT_HEAD} {article(name)}" if reconstruct else eval_prompt(name)


def build_labels(
    input_ids: torch.Tensor,
    prefix_lengths,
    pad_token_id: int | None,
    image_token_id: int | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM targets aligned with the logits: targets[:, t] is the label of token t+1.

    input_ids: (B, L) right-padded; prefix_lengths: B ints, number of leading tokens without loss (media tokens and
    BOS included, i.e. the token count of the prefix built the same way). Pads (attention_mask == 0, or id ==
    pad_token_id when no mask is given) and media tokens are ignored. Returns (B, L) long with -100 where no loss.
    """
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = IGNORE_INDEX
    elif pad_token_id is not None:
        labels[input_ids == pad_token_id] = IGNORE_INDEX
    if image_token_id is not None:
        labels[input_ids == image_token_id] = IGNORE_INDEX
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    prefix = torch.as_tensor(list(prefix_lengths), device=input_ids.device)[:, None]
    labels[positions < prefix] = IGNORE_INDEX
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (mean, or sum) over the positions whose target is not -100; logits (B, L, V), targets (B, L)."""
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
