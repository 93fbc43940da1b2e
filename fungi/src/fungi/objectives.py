"""The FUNGI objectives as modules: seeded random heads, their views, and a per-sample loss on embeddings.

Defaults are the paper scripts' values (spec b.), not the reference library's: KL T = 15, DINO 2 + 10 crops with a
2048-d head, SimCLR 49 patch views, 96-d head, 256 negative images, the paper's InfoNCE. DeepCluster (the experiment
repo's ablation, off by default): 2 + 6 crops, 3 heads of 3000 k-means prototypes, T = 0.1.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fungi.kmeans import inner_product_kmeans
from fungi.losses import (
    SIMCLR_VARIANTS,
    deepcluster_per_sample,
    deepcluster_targets,
    dino_per_sample,
    kl_uniform_per_sample,
    simclr_per_sample,
)
from fungi.views import dino_views, noise_roll_views, patchify_views, word_deletion

OBJECTIVES = ("kl", "dino", "simclr", "deepcluster")
DEFAULT_OBJECTIVES = ("kl", "dino", "simclr")  # the paper's; deepcluster is an ablation


def seeded_linear(in_dim: int, out_dim: int, gen: torch.Generator, bias: bool = True) -> nn.Linear:
    """nn.Linear with PyTorch's default init distribution (U(-1/sqrt(in), 1/sqrt(in)) for weight and bias) drawn
    from ``gen``, frozen."""
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    bound = 1.0 / math.sqrt(in_dim)
    with torch.no_grad():
        layer.weight.copy_(torch.empty(out_dim, in_dim).uniform_(-bound, bound, generator=gen))
        if bias:
            layer.bias.copy_(torch.empty(out_dim).uniform_(-bound, bound, generator=gen))
    layer.requires_grad_(False)
    return layer


class Objective(nn.Module):
    """Base class: ``views(inputs, seed)`` -> (B, V, ...) and ``forward(embeddings (B, V, E))`` -> losses (B,)."""

    name = ""

    def views(self, inputs, seed: int):
        """Identity view (the model's inference input): (B, ...) -> (B, 1, ...); text stays a list of lists."""
        if isinstance(inputs, list):
            return [[text] for text in inputs]
        return inputs.unsqueeze(1)


class KLObjective(Objective):
    """KL divergence between softmax(head(e / ||e||) / T) and the uniform distribution (paper Eq. 2)."""

    name = "kl"

    def __init__(self, embed_dim: int, gen: torch.Generator, temperature: float = 15.0, latent_dim: int = 768):
        super().__init__()
        self.temperature = temperature
        self.head = seeded_linear(embed_dim, latent_dim, gen)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        latents = self.head(F.normalize(embeddings.float(), dim=-1))
        return kl_uniform_per_sample(latents.flatten(0, 1), self.temperature).view(embeddings.shape[:2]).sum(1)


class DINOObjective(Objective):
    """DINO with a random student head on all views and a separate random teacher head on the global views of the
    same (frozen) backbone; L2-normalised embeddings in; same-view pairs included (paper Eq. 3)."""

    name = "dino"

    def __init__(
        self,
        embed_dim: int,
        gen: torch.Generator,
        latent_dim: int = 2048,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        num_global: int = 2,
        num_local: int = 10,
        global_scale: Sequence[float] = (0.25, 1.0),
        local_scale: Sequence[float] = (0.05, 0.25),
    ):
        super().__init__()
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.num_global, self.num_local = num_global, num_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.head = seeded_linear(embed_dim, latent_dim, gen)
        self.teacher_head = seeded_linear(embed_dim, latent_dim, gen)

    def views(self, inputs, seed: int):
        """DINO multi-crop of (B, C, H, W) images -> (B, num_global + num_local, C, H, W), global crops first."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            raise ValueError("the DINO objective needs image batches (B, C, H, W)")
        return dino_views(inputs, seed, self.num_global, self.num_local, self.global_scale, self.local_scale)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        z = F.normalize(embeddings.float(), dim=-1)
        teacher = self.teacher_head(z[:, : self.num_global].detach())
        return dino_per_sample(self.head(z), teacher, self.student_temperature, self.teacher_temperature)


class SimCLRObjective(Objective):
    """InfoNCE of a sample's views against a fixed bank of encoded negatives (paper Eq. 4). Views: overlapping patch
    crops for images, random word deletion for text, noise + time roll for audio. Negative-bank items get the same
    views for images, 2 for text and audio (``num_negative_text_views``, ``num_negative_audio_views``), as the
    reference's text and audio scripts."""

    name = "simclr"

    def __init__(
        self,
        embed_dim: int,
        gen: torch.Generator,
        latent_dim: int = 96,
        temperature: float = 0.07,
        variant: str = "paper",
        num_negatives: int = 256,
        num_patches: int = 4,
        stride_scale: int = 6,
        num_text_views: int = 12,
        num_negative_text_views: int = 2,
        word_drop: float = 0.1,
        num_audio_views: int = 16,
        num_negative_audio_views: int = 2,
    ):
        super().__init__()
        if variant not in SIMCLR_VARIANTS:
            raise ValueError(f"simclr variant must be one of {SIMCLR_VARIANTS}, got {variant!r}")
        self.temperature, self.variant, self.num_negatives = temperature, variant, num_negatives
        self.num_patches, self.stride_scale = num_patches, stride_scale
        self.num_text_views, self.num_negative_text_views, self.word_drop = (
            num_text_views,
            num_negative_text_views,
            word_drop,
        )
        self.num_audio_views, self.num_negative_audio_views = num_audio_views, num_negative_audio_views
        self.head = seeded_linear(embed_dim, latent_dim, gen)
        self.register_buffer("negatives", torch.zeros(0, latent_dim))

    def views(self, inputs, seed: int, negative: bool = False):
        """Images (B, C, S, S) -> patch crops (B, n*n, C, S, S); texts -> lists of word-deleted copies; audio
        (B, T, F) -> (B, V, T, F). ``negative``: the negative bank's (fewer) text / audio views."""
        if isinstance(inputs, list):
            n = self.num_negative_text_views if negative else self.num_text_views
            return [word_deletion(text, n, self.word_drop, seed) for text in inputs]
        if inputs.dim() == 4:
            return patchify_views(inputs, self.num_patches, self.stride_scale)
        if inputs.dim() == 3:
            n = self.num_negative_audio_views if negative else self.num_audio_views
            return noise_roll_views(inputs, n, seed)
        raise ValueError(f"unsupported input shape {tuple(inputs.shape)} for SimCLR views")

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Head on the raw (un-normalised) embeddings: (..., E) -> (..., L)."""
        return self.head(embeddings.float())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.negatives.shape[0] == 0:
            raise RuntimeError("the SimCLR negative bank is empty: call FUNGIExtractor.setup(train_dataset) first")
        return simclr_per_sample(self.encode(embeddings), self.negatives, self.temperature, self.variant)


def _require_images(inputs) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ValueError("the DeepCluster objective needs image batches (B, C, H, W), not text or audio")


class DeepClusterObjective(Objective):
    """DeepCluster-v2-like ablation of the experiment repo: for each of H heads and every crop, the cross-entropy of
    softmax(<prototypes, latent> / T) over the head's k-means prototypes against the sample's hard assignment.

    Latents: L2-normalised output of a bias-free random head with unit-norm rows (the reference's weight-normed
    head, g = 1). Views: 2 global + 6 local crops for the loss, then ``num_global`` more global crops that only pick
    the targets (head h: the crop h mod ``num_global``; they get no gradient); each set is its own draw (seeds
    ``seed + 2`` and ``seed + 1``), apart from the DINO objective's crops (``seed``). Targets are scored in float32
    with autocast off. Prototypes: ``fit`` on the training set's assignment crops (``FUNGIExtractor.setup``), shared
    by every split.
    """

    name = "deepcluster"

    def __init__(
        self,
        embed_dim: int,
        gen: torch.Generator,
        latent_dim: int = 128,
        num_prototypes: int = 3000,
        num_heads: int = 3,
        temperature: float = 0.1,
        num_global: int = 2,
        num_local: int = 6,
        global_scale: Sequence[float] = (0.14, 1.0),
        local_scale: Sequence[float] = (0.05, 0.14),
        kmeans_iters: int = 10,
    ):
        super().__init__()
        counts = {"num_prototypes": num_prototypes, "num_heads": num_heads, "num_global": num_global}
        for key, value in counts.items():
            if value < 1:
                raise ValueError(f"deepcluster.{key}={value}: expected at least 1")
        self.num_prototypes, self.temperature, self.kmeans_iters = num_prototypes, temperature, kmeans_iters
        self.num_global, self.num_local = num_global, num_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.head = seeded_linear(embed_dim, latent_dim, gen, bias=False)
        self.head.weight.div_(self.head.weight.norm(dim=1, keepdim=True))
        self.register_buffer("prototypes", torch.zeros(num_heads, 0, latent_dim))

    def assignment_views(self, inputs, seed: int) -> torch.Tensor:
        """The crops that pick the targets: (B, C, H, W) -> (B, num_global, C, H, W), another draw than the loss's."""
        _require_images(inputs)
        return dino_views(inputs, seed + 1, self.num_global, 0, self.global_scale, mode="bilinear")

    def views(self, inputs, seed: int):
        """(B, C, H, W) -> (B, 2 * num_global + num_local, C, H, W): the loss crops, then the assignment crops."""
        _require_images(inputs)
        crops = dino_views(
            inputs, seed + 2, self.num_global, self.num_local, self.global_scale, self.local_scale, mode="bilinear"
        )
        return torch.cat([crops, self.assignment_views(inputs, seed)], dim=1)

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Latents (..., E) -> (..., L), unit norm."""
        return F.normalize(self.head(embeddings.float()), dim=-1)

    def fit(self, latents: torch.Tensor, gen: torch.Generator) -> None:
        """Prototypes of each head: k-means of the training latents (N, num_global, L) of crop h mod num_global."""
        self.prototypes = torch.stack(
            [
                inner_product_kmeans(latents[:, h % latents.shape[1]], self.num_prototypes, gen, self.kmeans_iters)[0]
                for h in range(self.prototypes.shape[0])
            ]
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.prototypes.shape[1] == 0:
            raise RuntimeError("the DeepCluster prototypes are not fitted: call FUNGIExtractor.setup(train_dataset)")
        num_crops = self.num_global + self.num_local
        with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
            targets = deepcluster_targets(self.encode(embeddings[:, num_crops:].float()), self.prototypes)
        z = self.encode(embeddings[:, :num_crops])
        return deepcluster_per_sample(z, self.prototypes, targets, self.temperature)


OBJECTIVE_CLASSES = {cls.name: cls for cls in (KLObjective, DINOObjective, SimCLRObjective, DeepClusterObjective)}


def build_objective(name: str, embed_dim: int, gen: torch.Generator, **options) -> Objective:
    """Objective ``name`` in ('kl', 'dino', 'simclr', 'deepcluster') with its heads drawn from ``gen``."""
    if name not in OBJECTIVE_CLASSES:
        raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
    return OBJECTIVE_CLASSES[name](embed_dim, gen, **options)


def resolved_options(name: str, options: Mapping | None = None) -> dict:
    """All constructor options of objective ``name``: its defaults updated with ``options``, tuples as lists (as
    they come back from JSON), so two settings that build the same objective compare equal."""
    if name not in OBJECTIVE_CLASSES:
        raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
    params = list(inspect.signature(OBJECTIVE_CLASSES[name].__init__).parameters.values())[3:]
    resolved = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    resolved.update(options or {})
    return json.loads(json.dumps(resolved))
