"""Per-patch FUNGI features for in-context segmentation (Hummingbird), as in the paper's fungi-hummingbird code.

For each image, a SimCLR-style loss on its last-layer tokens (CLS included): the positives of a token are all other
tokens of the image; the negatives are pooled over the image: every token's ``num_negatives`` nearest patches in a
support memory (patch tokens of training images), each memory row kept with probability ``negative_fraction``. The
gradient of ``attn.proj`` attributable to patch token t is the rank-1 G_t (x) [A_t, 1]; it is projected with the
shared +-1 matrix without materialising it, L2-normalised and concatenated with the token:
feature_t = L2norm(cat(L2norm(token_t), L2norm(P vec(G_t (x) [A_t, 1])))).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from funai_common.search import NeighborIndex
from fungi.gradients import default_layer, get_linear, gradient_shape, layer_io_gradients
from fungi.losses import SELF_SIMILARITY, SIMCLR_VARIANTS
from fungi.objectives import seeded_linear
from fungi.projection import random_projection


class PatchTokens(nn.Module):
    """timm ViT -> last-layer tokens after the final norm: patch tokens (n, N, E), or all (n, T, E) with
    ``keep_prefix``."""

    def __init__(self, model: nn.Module, keep_prefix: bool = False):
        super().__init__()
        self.model, self.keep_prefix = model, keep_prefix

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(images)
        return tokens if self.keep_prefix else tokens[:, getattr(self.model, "num_prefix_tokens", 1) :]


def pooled_token_infonce(
    latents: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.07, variant: str = "library"
) -> torch.Tensor:
    """InfoNCE of one image's tokens against a shared negative batch: latents (T, L), negatives (M, L) -> scalar.

    S = cosine similarities of token i with the other tokens (self = -10000) and with every negative;
    pos_i = mean_{j != i} S_ij / tau; 'paper': nll_i = -pos_i + lse(S_i / tau); 'library' (the Hummingbird code):
    nll_i = -(pos_i + 10000 / tau) + lse(S_i) (the constant only shifts the loss). Returns mean_i nll_i.
    """
    if variant not in SIMCLR_VARIANTS:
        raise ValueError(f"variant must be one of {SIMCLR_VARIANTS}, got {variant!r}")
    z = F.normalize(latents.float(), dim=-1)
    neg = F.normalize(negatives.float(), dim=-1)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim_pos = (z @ z.T).masked_fill(eye, SELF_SIMILARITY)
    pos = sim_pos.masked_fill(eye, 0.0).sum(-1) / ((n - 1) * temperature)
    sims = torch.cat([z @ neg.T, sim_pos], dim=-1)
    if variant == "paper":
        nll = -pos + torch.logsumexp(sims / temperature, -1)
    else:
        nll = -(pos - SELF_SIMILARITY / temperature) + torch.logsumexp(sims, -1)
    return nll.mean()


def project_token_gradients(
    grad_out: torch.Tensor, acts: torch.Tensor, projection: torch.Tensor, chunk: int = 64, bias: bool = True
) -> torch.Tensor:
    """s * P vec(G_t (x) [A_t, 1]) for every token without forming the outer products: G (T, O), A (T, I),
    P (E, O * (I + 1)) -> (T, E), s = 1 / sqrt(E); G_t (x) A_t and P (E, O * I) for a layer without ``bias``."""
    tokens, out_dim = grad_out.shape
    embed = projection.shape[0]
    p = projection.float().reshape(embed, out_dim, -1)
    acts1 = acts.float()
    if bias:
        acts1 = torch.cat([acts1, acts1.new_ones(tokens, 1)], dim=1)
    rows = []
    for start in range(0, tokens, chunk):
        a, g = acts1[start : start + chunk], grad_out[start : start + chunk].float()
        rows.append(torch.einsum("eoi,ti,to->te", p, a, g))
    return torch.cat(rows) / math.sqrt(embed)


class PatchFUNGI:
    """Per-patch FUNGI features of a timm ViT: ``__call__(images (B, 3, H, W)) -> (B, N, 2E)``; usable as the
    ``feature_fn`` of ``funai_common.hummingbird.HummingbirdEvaluator``. Give it a support memory first
    (``set_memory`` with patch features, or ``setup`` with images). ``layer``: the dotted name of the ``nn.Linear``
    inside ``model`` whose gradients are taken (default: the last block's attention output projection).

    ``negative_fraction`` plays the reference's negative-batch percent; the reference redraws the kept negatives on
    every call, here each memory row is kept or not once (seeded), so a feature depends only on its image.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        seed: int = 42,
        latent_dim: int = 96,
        temperature: float = 0.07,
        num_negatives: int = 2,
        negative_fraction: float = 0.5,
        variant: str = "library",
        device: str | torch.device = "cpu",
        backend: str = "auto",
    ):
        if not 0.0 < negative_fraction <= 1.0:
            raise ValueError(f"negative_fraction must be in (0, 1], got {negative_fraction}")
        self.tokens = PatchTokens(model, keep_prefix=True).to(device).eval().requires_grad_(False)
        self.num_prefix = getattr(model, "num_prefix_tokens", 1)
        layer = layer or default_layer(model)
        linear = get_linear(model, layer)  # a name inside `model`, as fungi-extract's `layer`
        self.layer = f"model.{layer}"  # the same module inside self.tokens
        embed = model.num_features
        self.seed, self.temperature, self.variant = seed, temperature, variant
        self.num_negatives, self.negative_fraction, self.device = num_negatives, negative_fraction, torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        self.head = seeded_linear(embed, latent_dim, gen).to(device)
        out_dim, in_dim = gradient_shape(linear)
        self.bias = linear.bias is not None
        self.projection = random_projection(embed, out_dim * in_dim, seed).to(torch.int8).to(device)
        self.backend = backend
        self.memory: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        self._index: NeighborIndex | None = None

    @torch.no_grad()
    def setup(self, batches: Iterable[torch.Tensor]) -> None:
        """Support memory from the patch tokens of the given image batches (see ``set_memory``)."""
        feats = [self.tokens(x.to(self.device))[:, self.num_prefix :].flatten(0, 1).float() for x in batches]
        self.set_memory(torch.cat(feats))

    @torch.no_grad()
    def set_memory(self, patch_features: torch.Tensor) -> None:
        """Support memory from (M, E) patch features of the backbone (e.g. the Hummingbird memory of its tokens),
        L2-normalised; each row is kept as a negative with probability ``negative_fraction`` (seeded draw)."""
        if patch_features.ndim != 2 or patch_features.shape[1] != self.head.in_features:
            raise ValueError(
                f"support features must be (M, {self.head.in_features}), got {tuple(patch_features.shape)}"
            )
        if len(patch_features) < self.num_negatives:
            raise ValueError(f"support memory has {len(patch_features)} rows, fewer than {self.num_negatives}")
        self.memory = F.normalize(patch_features.float().to(self.device), dim=-1)
        draws = torch.rand(len(patch_features), generator=torch.Generator().manual_seed(self.seed))
        self.kept = (draws < self.negative_fraction).to(self.device)
        self._index = NeighborIndex(self.memory, backend=self.backend)  # built once, searched for every batch

    def negatives(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the pooled negative batch: the kept rows among its tokens' nearest memory patches (rows of
        the memory, repeats included as in the reference)."""
        if self.memory is None:
            raise RuntimeError("PatchFUNGI needs a support memory: call set_memory(...) or setup(...) first")
        queries = F.normalize(tokens.detach().flatten(0, 1).float(), dim=-1)
        _, idx = self._index.search(queries, self.num_negatives)
        idx = idx.to(self.memory.device).reshape(tokens.shape[0], -1)
        return [self.memory[row[self.kept[row]]] for row in idx]

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-image pooled token InfoNCE (B,) of all last-layer tokens (B, T, E) against their negatives."""
        losses = [
            pooled_token_infonce(self.head(t.float()), self.head(neg), self.temperature, self.variant)
            for t, neg in zip(tokens, self.negatives(tokens))
        ]
        return torch.stack(losses)

    def token_gradients(self, images: torch.Tensor, keep_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, N, E), projected per-token gradients (B, N, E), not normalised) of the patch tokens, or of
        every token (CLS included) with ``keep_prefix``."""
        store: dict[str, torch.Tensor] = {}

        def loss_fn(tokens: torch.Tensor) -> torch.Tensor:
            store["tokens"] = tokens.detach()
            return self.loss(tokens)

        acts, grad_out = layer_io_gradients(self.tokens, self.layer, images.to(self.device), loss_fn)
        first = 0 if keep_prefix else self.num_prefix
        tokens, acts, grad_out = store["tokens"][:, first:], acts[:, first:], grad_out[:, first:]
        batch, num = tokens.shape[:2]
        grads = project_token_gradients(grad_out.flatten(0, 1), acts.flatten(0, 1), self.projection, bias=self.bias)
        return tokens, grads.reshape(batch, num, -1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tokens, grads = self.token_gradients(images)
        return F.normalize(torch.cat([F.normalize(tokens.float(), dim=-1), F.normalize(grads, dim=-1)], -1), dim=-1)
