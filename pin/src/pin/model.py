"""The positional insert: pi = psi(S), a fixed sin-cos table S through a small MLP psi, added to vision tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def sincos_table(num_tokens: int, dim: int) -> torch.Tensor:
    """1-D transformer sin-cos table over the flattened token index, (num_tokens, dim) float32.

    S[p, j] = sin(p / 10000^(2*floor(j/2)/dim)) for even j, cos(...) for odd j.
    """
    if num_tokens < 1 or dim < 1:
        raise ValueError(f"num_tokens and dim must be >= 1, got {num_tokens}, {dim}")
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    freq = torch.pow(10000.0, -(2 * (j // 2)).to(torch.float64) / dim)
    angle = pos * freq[None, :]
    table = torch.where(j[None, :] % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32)


class PositionalInsert(nn.Module):
    """psi(S): Linear -> SiLU -> LayerNorm per hidden width, then a last Linear to the token width.

    Args:
        num_tokens: N, visual tokens per image (257 for BLIP-2 ViT-g/14 at 224 px incl. CLS, 256 for OF ViT-L/14).
        token_dim: D, width of the vision tokens (1408 BLIP-2, 1024 OF).
        table_dim: width of the sin-cos table (64 in the paper).
        hidden_dims: hidden widths of psi (512, 768 in the paper).
        learned_table: make S a trainable tensor initialised uniform +-sqrt(2/(N+table_dim)) (reference option).
    """

    def __init__(
        self,
        num_tokens: int,
        token_dim: int,
        table_dim: int = 64,
        hidden_dims: Sequence[int] = (512, 768),
        learned_table: bool = False,
    ) -> None:
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        layers: list[nn.Module] = []
        width = table_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.SiLU(), nn.LayerNorm(hidden)]
            width = hidden
        layers.append(nn.Linear(width, token_dim))
        self.mlp = nn.Sequential(*layers)
        table = sincos_table(num_tokens, table_dim)[None]
        if learned_table:
            bound = math.sqrt(2.0 / (num_tokens + table_dim))
            self.pos_enc = nn.Parameter(torch.empty_like(table).uniform_(-bound, bound))
        else:
            self.register_buffer("pos_enc", table)

    def forward(self) -> torch.Tensor:
        """The insert pi, (1, num_tokens, token_dim)."""
        return self.mlp(self.pos_enc)

    def add_to(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """vision_tokens (..., num_tokens, token_dim) + pi, broadcast over every leading dimension."""
        if vision_tokens.shape[-2:] != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"vision tokens end in {tuple(vision_tokens.shape[-2:])}, PIN expects ({self.num_tokens}, "
                f"{self.token_dim}); build the insert for this backbone and image size"
            )
        insert = self()[0].to(vision_tokens.dtype)
        return vision_tokens + insert
