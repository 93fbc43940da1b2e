"""The self-supervised objectives of FUNGI as pure functions.

Each objective has a per-sample form (``*_per_sample``: one loss per sample, samples never interact) used to get
per-sample gradients in one backward pass, and the public scalar form (the mean of the per-sample losses).
Equation numbers refer to arXiv 2407.10964 (Sec. 3); the constants are those of the paper's scripts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SELF_SIMILARITY = -10000.0  # the reference's "-10e3": masks the similarity of a view with itself
SIMCLR_VARIANTS = ("paper", "library")


def kl_uniform_per_sample(latents: torch.Tensor, temperature: float = 15.0) -> torch.Tensor:
    """KL(uniform || softmax(latents / T)) averaged over the L classes: (N, L) -> (N,).

    The mean of this vector equals ``F.kl_div(log_softmax(latents / T), uniform, reduction="mean")``.
    """
    num_classes = latents.shape[-1]
    log_p = F.log_softmax(latents.float() / temperature, dim=-1)
    log_u = -math.log(num_classes)
    return (log_u - log_p).sum(-1) * (1.0 / num_classes) / num_classes


def kl_uniform_loss(latents: torch.Tensor, temperature: float = 15.0) -> torch.Tensor:
    """KL-to-uniform objective (paper Eq. 2): latents (N, L) -> scalar, PyTorch ``kl_div(..., reduction="mean")``."""
    return kl_uniform_per_sample(latents, temperature).mean()


def dino_per_sample(
    student: torch.Tensor, teacher: torch.Tensor, student_temperature: float = 0.1, teacher_temperature: float = 0.07
) -> torch.Tensor:
    """Per-sample DINO loss: student (B, V, L), teacher (B, G, L) -> (B,).

    sum_g sum_v CE(softmax(teacher_g / t_t), log_softmax(student_v / t_s)), same-view pairs included; the teacher is
    detached. The double sum factorises: -<sum_g p_g, sum_v log q_v>.
    """
    p = F.softmax(teacher.detach().float() / teacher_temperature, dim=-1).sum(1)
    log_q = F.log_softmax(student.float() / student_temperature, dim=-1).sum(1)
    return -(p * log_q).sum(-1)


def dino_loss(
    student: torch.Tensor, teacher: torch.Tensor, student_temperature: float = 0.1, teacher_temperature: float = 0.07
) -> torch.Tensor:
    """DINO objective without centering/EMA (paper Eq. 3): student (B, V, L), teacher (B, G, L) -> scalar mean."""
    return dino_per_sample(student, teacher, student_temperature, teacher_temperature).mean()


def simclr_per_sample(
    views: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.07, variant: str = "paper"
) -> torch.Tensor:
    """Per-sample InfoNCE of V positive views against a fixed negative bank: views (B, V, L), negatives (K, L) -> (B,).

    Rows are L2-normalised; S_ij = cos(view_i, row_j) over rows [negatives; views], the self-similarity set to -10000;
    pos_i = mean_{j != i} S_ij / tau over the other views of the same sample.
    ``variant="paper"`` (vision experiment code): nll_i = -pos_i + logsumexp_k(S_ik / tau).
    ``variant="library"`` (fungivision, text code): nll_i = -(pos_i + 10000 / tau) + logsumexp_k S_ik.
    Returns mean_i nll_i per sample.
    """
    if variant not in SIMCLR_VARIANTS:
        raise ValueError(f"simclr variant must be one of {SIMCLR_VARIANTS}, got {variant!r}")
    batch, num_views, _ = views.shape
    if num_views < 2:
        raise ValueError(f"simclr needs at least 2 views per sample, got {num_views}")
    z = F.normalize(views.float(), dim=-1)
    neg = F.normalize(negatives.float().to(z.device), dim=-1)
    sim_neg = z @ neg.T  # (B, V, K)
    sim_pos = z @ z.transpose(1, 2)  # (B, V, V)
    eye = torch.eye(num_views, dtype=torch.bool, device=z.device)
    sim_pos = sim_pos.masked_fill(eye, SELF_SIMILARITY)
    pos = sim_pos.masked_fill(eye, 0.0).sum(-1) / ((num_views - 1) * temperature)
    sims = torch.cat([sim_neg, sim_pos], dim=-1)
    if variant == "paper":
        nll = -pos + torch.logsumexp(sims / temperature, dim=-1)
    else:
        nll = -(pos - SELF_SIMILARITY / temperature) + torch.logsumexp(sims, dim=-1)
    return nll.mean(-1)


def simclr_loss(
    views: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.07, variant: str = "paper"
) -> torch.Tensor:
    """SimCLR objective (paper Eq. 4): views (B, V, L), negatives (K, L) -> scalar mean over samples."""
    return simclr_per_sample(views, negatives, temperature, variant).mean()


def deepcluster_targets(latents: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Hard assignments: latents (B, G, L) of the assignment crops, prototypes (H, K, L) -> (B, H) long; head h
    assigns crop h mod G to its prototype of largest inner product."""
    crops = latents[:, torch.arange(prototypes.shape[0]) % latents.shape[1]]  # (B, H, L)
    return torch.einsum("bhl,hkl->bhk", crops.float(), prototypes.float()).argmax(-1)


def deepcluster_per_sample(
    latents: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Per-sample DeepCluster loss: latents (B, V, L), prototypes (H, K, L), targets (B, H) -> (B,).

    mean over heads h and views v of CE(softmax(<prototypes_h, latent_v> / T), targets_h).
    """
    scores = torch.einsum("bvl,hkl->bhvk", latents.float(), prototypes.float()) / temperature
    log_p = F.log_softmax(scores, dim=-1)
    index = targets[:, :, None, None].expand(-1, -1, latents.shape[1], 1)
    return -log_p.gather(-1, index).mean((1, 2, 3))


def deepcluster_loss(
    latents: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """DeepCluster-v2-like objective (the experiment repo's ablation): scalar mean of ``deepcluster_per_sample``."""
    return deepcluster_per_sample(latents, prototypes, targets, temperature).mean()
