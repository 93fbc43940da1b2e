"""FIFO queue of teacher patch embeddings used as NeCo reference patches (spec section 4, step 2)."""

from __future__ import annotations

import torch
from torch import nn


class PatchQueue(nn.Module):
    """One FIFO queue of ``length`` patch embeddings per global crop; newest entries at the front.

    ``filled`` counts the valid entries of each queue (the reference counts both queues into one counter and
    samples ``randperm(length) mod filled``; here each queue is sampled uniformly among its own valid entries).
    """

    def __init__(self, num_queues: int, length: int, dim: int) -> None:
        super().__init__()
        self.length = length
        self.register_buffer("entries", torch.zeros(num_queues, length, dim))
        self.register_buffer("filled", torch.zeros(num_queues, dtype=torch.long))

    @torch.no_grad()
    def push(self, index: int, patches: torch.Tensor) -> None:
        """Insert ``patches`` (K, D) at the front of queue ``index``, dropping the oldest K entries."""
        k = min(len(patches), self.length)
        self.entries[index] = torch.cat([patches[:k].to(self.entries), self.entries[index, : self.length - k]])
        self.filled[index] = min(int(self.filled[index]) + k, self.length)

    @torch.no_grad()
    def push_random(
        self, index: int, teacher_tokens: torch.Tensor, per_image: int = 10, mask: torch.Tensor | None = None
    ) -> None:
        """Push min(per_image * B, length) random patches of ``teacher_tokens`` (B, N, D) (global torch RNG).

        ``mask`` (B, N) 0/1 (``loss.mask`` fg / bg): only patches inside it are candidates; all of them if fewer.
        """
        flat = teacher_tokens.reshape(-1, teacher_tokens.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1) > 0]
        count = min(per_image * teacher_tokens.shape[0], self.length)
        self.push(index, flat[torch.randperm(len(flat), device=flat.device)[:count]])

    def banks(self) -> list[torch.Tensor]:
        """The valid entries of each queue, newest first: a list of (filled_c, D) tensors."""
        return [self.entries[i, : int(self.filled[i])] for i in range(len(self.entries))]
