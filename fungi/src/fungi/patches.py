"""Per-patch FUNGI features for in-context segmentation (Hummingbird), as in the paper's fungi-hummingbird code.

For each image, a SimCLR-style loss on the patch tokens: the positives of a token are all other tokens of the same
image, its negatives are its 2 nearest patches in a support memory bank (patch features of training images, 50 %
randomly subsampled). The gradient of ``attn.proj`` attributable to token t is the rank-1 G_t (x) [A_t, 1]; it is
projected with the shared +-1 matrix without materialising it, L2-normalised and concatenated with the token:
feature_t = L2norm(cat(L2norm(token_t), L2norm(P vec(G_t (x) [A_t, 1])))).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from funai_common.search import nearest_neighbors
from fungi.gradients import default_layer, get_linear, layer_io_gradients
from fungi.losses import SELF_SIMILARITY, SIMCLR_VARIANTS
from fungi.objectives import seeded_linear
from fungi.projection import random_projection


class PatchTokens(nn.Module):
    """timm ViT -> patch tokens (n, N, E) of the last layer (prefix tokens dropped)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)[:, getattr(self.model, "num_prefix_tokens", 1) :]


def token_infonce(
    latents: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.07, variant: str = "library"
) -> torch.Tensor:
    """Per-image InfoNCE over tokens: latents (B, N, L), per-token negatives (B, N, K, L) -> (B,).

    S = cosine similarities of token i with the other tokens (self = -10000) and with its K negatives;
    pos_i = mean_{j != i} S_ij / tau; 'paper': nll_i = -pos_i + lse(S_i / tau); 'library' (the Hummingbird code):
    nll_i = -(pos_i + 10000 / tau) + lse(S_i). Returns mean_i nll_i.
    """
    if variant not in SIMCLR_VARIANTS:
        raise ValueError(f"variant must be one of {SIMCLR_VARIANTS}, got {variant!r}")
    z = F.normalize(latents.float(), dim=-1)
    neg = F.normalize(negatives.float(), dim=-1)
    n = z.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim_pos = (z @ z.transpose(1, 2)).masked_fill(eye, SELF_SIMILARITY)
    sim_neg = torch.einsum("bnl,bnkl->bnk", z, neg)
    pos = sim_pos.masked_fill(eye, 0.0).sum(-1) / ((n - 1) * temperature)
    sims = torch.cat([sim_pos, sim_neg], dim=-1)
    if variant == "paper":
        nll = -pos + torch.logsumexp(sims / temperature, -1)
    else:
        nll = -(pos - SELF_SIMILARITY / temperature) + torch.logsumexp(sims, -1)
    return nll.mean(-1)


def project_token_gradients(
    grad_out: torch.Tensor, acts: torch.Tensor, projection: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """s * P vec(G_t (x) [A_t, 1]) for every token without forming the outer products: G (T, O), A (T, I),
    P (E, O * (I + 1)) -> (T, E), s = 1 / sqrt(E)."""
    tokens, out_dim = grad_out.shape
    embed = projection.shape[0]
    p = projection.float().reshape(embed, out_dim, -1)
    acts1 = torch.cat([acts.float(), acts.new_ones(tokens, 1, dtype=torch.float32)], dim=1)
    rows = []
    for start in range(0, tokens, chunk):
        a, g = acts1[start : start + chunk], grad_out[start : start + chunk].float()
        rows.append(torch.einsum("eoi,ti,to->te", p, a, g))
    return torch.cat(rows) / math.sqrt(embed)


class PatchFUNGI:
    """Per-patch FUNGI features of a timm ViT: ``__call__(images (B, 3, H, W)) -> (B, N, 2E)``; usable as the
    ``feature_fn`` of ``funai_common.hummingbird.HummingbirdEvaluator``. Call ``setup`` with support images first."""

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        seed: int = 42,
        latent_dim: int = 96,
        temperature: float = 0.07,
        num_negatives: int = 2,
        subsample: float = 0.5,
        variant: str = "library",
        device: str | torch.device = "cpu",
    ):
        self.tokens = PatchTokens(model).to(device).eval().requires_grad_(False)
        self.layer = layer or default_layer(self.tokens)
        linear = get_linear(self.tokens, self.layer)
        embed = model.num_features
        self.seed, self.temperature, self.variant = seed, temperature, variant
        self.num_negatives, self.subsample, self.device = num_negatives, subsample, torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        self.head = seeded_linear(embed, latent_dim, gen).to(device)
        grad_dim = linear.out_features * (linear.in_features + 1)
        self.projection = random_projection(embed, grad_dim, seed).to(torch.int8).to(device)
        self.memory: torch.Tensor | None = None

    @torch.no_grad()
    def setup(self, batches: Iterable[torch.Tensor]) -> None:
        """Support memory from the patch tokens of the given image batches (see ``set_memory``)."""
        self.set_memory(torch.cat([self.tokens(x.to(self.device)).flatten(0, 1).float() for x in batches]))

    @torch.no_grad()
    def set_memory(self, patch_features: torch.Tensor) -> None:
        """Support memory from (M, E) patch features of the backbone (e.g. a Hummingbird memory of its tokens):
        a seeded random ``subsample`` of the rows (at least ``num_negatives``), L2-normalised."""
        if patch_features.ndim != 2 or patch_features.shape[1] != self.head.in_features:
            raise ValueError(
                f"support features must be (M, {self.head.in_features}), got {tuple(patch_features.shape)}"
            )
        gen = torch.Generator().manual_seed(self.seed)
        count = len(patch_features)
        keep = torch.randperm(count, generator=gen)[: max(self.num_negatives, int(count * self.subsample))]
        self.memory = F.normalize(patch_features[keep.to(patch_features.device)].float().to(self.device), dim=-1)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-image token InfoNCE (B,) of patch tokens (B, N, E) against their nearest memory patches."""
        if self.memory is None:
            raise RuntimeError("PatchFUNGI needs a support memory: call setup(batches_of_train_images) first")
        queries = F.normalize(tokens.detach().flatten(0, 1).float(), dim=-1)
        _, idx = nearest_neighbors(queries, self.memory, self.num_negatives)
        negatives = self.head(self.memory[idx.to(self.memory.device)])
        negatives = negatives.reshape(*tokens.shape[:2], self.num_negatives, -1)
        return token_infonce(self.head(tokens.float()), negatives, self.temperature, self.variant)

    def token_gradients(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens (B, N, E), projected per-token gradients (B, N, E), not normalised)."""
        store: dict[str, torch.Tensor] = {}

        def loss_fn(tokens: torch.Tensor) -> torch.Tensor:
            store["tokens"] = tokens.detach()
            return self.loss(tokens)

        acts, grad_out = layer_io_gradients(self.tokens, self.layer, images.to(self.device), loss_fn)
        tokens = store["tokens"]
        batch, num = tokens.shape[:2]
        prefix = acts.shape[1] - num  # the layer also sees the prefix tokens (zero gradient); keep the patch rows
        acts, grad_out = acts[:, prefix:], grad_out[:, prefix:]
        grads = project_token_gradients(grad_out.flatten(0, 1), acts.flatten(0, 1), self.projection)
        return tokens, grads.reshape(batch, num, -1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tokens, grads = self.token_gradients(images)
        return F.normalize(torch.cat([F.normalize(tokens.float(), dim=-1), F.normalize(grads, dim=-1)], -1), dim=-1)
