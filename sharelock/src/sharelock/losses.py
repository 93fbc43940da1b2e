"""Symmetric CLIP InfoNCE loss with the fixed ShareLock temperature."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The reference uses exp(2.6592) (CLIP's initial log-scale, ~1/0.07), fixed rather than learned. Computed in float32.
LOG_LOGIT_SCALE = 2.6592
LOGIT_SCALE = float(torch.tensor(LOG_LOGIT_SCALE, dtype=torch.float32).exp())


def clip_loss(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float = LOGIT_SCALE
) -> torch.Tensor:
    """Symmetric contrastive loss 0.5 * (CE(s I T^T) + CE(s T I^T)) with targets arange(B).

    image_embeddings, text_embeddings: (B, D), used as given (no normalisation here). Returns a scalar. Negatives are
    the other rows of this batch only.
    """
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
        raise ValueError(
            f"clip_loss expects two (B, D) tensors of equal shape, got {tuple(image_embeddings.shape)} "
            f"and {tuple(text_embeddings.shape)}"
        )
    logits = logit_scale * image_embeddings @ text_embeddings.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
