"""The NeCo patch-neighbour-order loss (spec section 4; paper Sec. 3, Eqs. 1-4).

For every pair (global crop c, other crop v) the teacher map of c and the student map of v are RoI-aligned onto
their overlap (7x7 locations each). Every aligned location ranks a shared set of 49 reference patches by cosine
similarity with a differentiable sorting network; the student is trained with the cross-entropy between the
teacher's and its own soft rank distributions, averaged over the 2 x 5 pairs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.ops import roi_align

from neco.crops import overlap_boxes
from neco.sorting import soft_sort

ROI_SIZE = 7  # roi_align_kernel_size of the reference: 7 x 7 aligned locations, 49 references


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)``, or nothing where autocast does not exist (the meta device)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def neighbor_ranks(
    queries: torch.Tensor,
    references: torch.Tensor,
    steepness: float = 100.0,
    network: str = "bitonic",
    similarity: str = "cosine",
) -> torch.Tensor:
    """Soft ranks of each image's references for each query, (B, Q, R, R).

    queries (B, Q, D), references (B, R, D). Similarities are cosines of L2-normalised vectors (``"cosine"``)
    or Euclidean distances (``"euclidean"``), soft-sorted ascending; entry [b, q, i, j] is the weight with which
    reference i lands at rank j.

    Computed in at least float32 with autocast off: in bfloat16 (e.g. inside a ``torch.autocast`` region, which
    casts the similarity matmul) comparator weights round to exactly 0 or 1, ranks of exactly 0 appear and
    ``rank_cross_entropy`` becomes inf / NaN. Half-precision inputs thus give float32 ranks.
    """
    if queries.dim() != 3 or references.dim() != 3 or queries.shape[::2] != references.shape[::2]:
        raise ValueError(
            f"expected queries (B, Q, D) and references (B, R, D), got {tuple(queries.shape)} and "
            f"{tuple(references.shape)}"
        )
    if similarity not in ("cosine", "euclidean"):
        raise ValueError(f"unknown similarity {similarity!r}; expected 'cosine' or 'euclidean'")
    dtype = torch.promote_types(torch.promote_types(queries.dtype, references.dtype), torch.float32)
    with _autocast_off(queries.device.type):
        queries, references = queries.to(dtype), references.to(dtype)
        if similarity == "cosine":
            sim = torch.einsum("bqd,brd->bqr", F.normalize(queries, dim=-1), F.normalize(references, dim=-1))
        else:
            sim = torch.cdist(queries, references, p=2.0)
        b, q, r = sim.shape
        _, perm = soft_sort(sim.reshape(b * q, r), network=network, steepness=steepness)
    return perm.reshape(b, q, r, r)


def rank_cross_entropy(
    teacher_ranks: torch.Tensor, student_ranks: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """-mean over (b, q, i) of sum_j teacher[b, q, i, j] * log(student[b, q, i, j]); teacher carries no gradient.

    With ``mask`` (B, Q) bool the mean runs over the selected (b, q) only (and all i); 0 when none is selected.
    As in the reference there is no epsilon: soft permutations of the Cauchy relaxation are strictly positive.
    """
    if teacher_ranks.shape != student_ranks.shape:
        raise ValueError(f"rank shapes differ: {tuple(teacher_ranks.shape)} vs {tuple(student_ranks.shape)}")
    ce = -(teacher_ranks.detach() * torch.log(student_ranks)).sum(-1)
    if mask is None:
        return ce.mean()
    return ce[mask].sum() / (mask.sum().clamp(min=1) * ce.shape[-1])


def _to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) row-major tokens -> (B, D, S, S) feature map."""
    b, n, d = tokens.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"expected a square number of patch tokens, got {n}")
    return tokens.transpose(1, 2).reshape(b, d, side, side)


def align(tokens: torch.Tensor, boxes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """RoI-align each image's token map onto its box (B, 4) in pixels of that crop: (B, 49, D) row-major.
    Half-precision tokens are aligned in float32 (torchvision's CPU roi_align has no bfloat16 kernel)."""
    fmap = _to_map(tokens)
    fmap = fmap.to(torch.promote_types(fmap.dtype, torch.float32))
    index = torch.arange(len(boxes), device=fmap.device, dtype=fmap.dtype)[:, None]
    rois = torch.cat([index, boxes.to(device=fmap.device, dtype=fmap.dtype) / patch_size], 1)
    out = roi_align(fmap, rois, ROI_SIZE, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.flatten(2).transpose(1, 2)


def aligned_mask(mask: torch.Tensor, boxes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Bool (B, 49): the aligned locations of ``align`` lying wholly inside the 0/1 token mask (B, N), i.e. whose
    RoI-aligned mask value is 1 (up to float rounding, which the reference's exact ``>= 1.0`` test does not allow)."""
    return align(mask[..., None].float(), boxes, patch_size)[..., 0] >= 1 - 1e-5


@dataclass
class BatchGather:
    """How to see the whole (multi-process) batch: ``fn`` concatenates a tensor over processes along dim 0 and
    ``offset`` is the number of images held by lower ranks and ``total`` the number of images over all processes
    (None: this process's batch). Default: a single process."""

    fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    offset: int = 0
    total: int | None = None


def pair_order(num_global: int, num_crops: int) -> list[tuple[int, int]]:
    """The (c, v) crop pairs in loss order: c = 0..num_global-1, v = 0..num_crops-1 skipping v = c."""
    return [(c, v) for c in range(num_global) for v in range(num_crops) if v != c]


def _draw(total: int, count: int, device: torch.device, tile: bool = False) -> torch.Tensor:
    """Indices of ``count`` references among ``total`` entries: without replacement when possible; else, with
    ``tile``, every entry floor(count / total) or ceil(count / total) times in random order (the reference's
    tile-and-shuffle of masked patches), otherwise independent draws."""
    if total >= count:
        return torch.randperm(total, device=device)[:count]
    if tile:
        return torch.randperm(count, device=device) % total
    return torch.randint(0, total, (count,), device=device)


def neco_loss(
    teacher_global: Sequence[torch.Tensor],
    student_crops: Sequence[torch.Tensor],
    crop_boxes: torch.Tensor,
    crop_sizes: Sequence[int] | torch.Tensor,
    patch_size: int = 14,
    references: Sequence[torch.Tensor] | None = None,
    ref_indices: Sequence[torch.Tensor] | None = None,
    steepness: float = 100.0,
    network: str = "bitonic",
    teacher_steepness: float | None = None,
    similarity: str = "cosine",
    gather: BatchGather | None = None,
    checkpoint_sort: bool = False,
    masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """NeCo objective ``(1/G) sum_c (1/(C-1)) sum_{v != c} CE(P_t(c, v), P_s(c, v))`` (spec section 4).

    teacher_global: num_global tensors (B, N, D) of teacher head outputs on the global crops (row-major tokens;
    detached here). student_crops: C tensors (B, N_c, D), globals first. crop_boxes (B, C, 4) absolute xyxy;
    crop_sizes the C crop sizes in pixels. References per pair (c, v):

    - ``references=None`` (queue off): the B*49 aligned teacher patches of the pair, pooled over the batch and
      shuffled; image b's reference i is ``pooled[perm[b*49 + i]]`` with pooled[b*49 + h*7 + w] its aligned patch.
    - ``references``: one bank (R_c, D) per global crop (the filled part of the FIFO queue); each pair draws B*49
      entries, image b's reference i being ``bank[perm[b*49 + i]]``.

    ``ref_indices`` injects ``perm`` (one 1-D tensor per pair, ``pair_order``); otherwise it is drawn from the
    global torch RNG. ``gather`` pools over all processes so that a multi-process run equals a single-process
    run on the same global batch. ``checkpoint_sort`` recomputes the student sort in backward (saves memory).

    ``masks`` (``loss.mask`` fg / bg): one 0/1 (B, N_c) token mask per global crop. Pair (c, v) then counts only the
    aligned locations inside the mask of c (``aligned_mask``), averaging over those of the whole (multi-process)
    batch; a pair without any adds 0. With the queue off its references are the teacher patches at those locations,
    tiled to the number needed and shuffled when there are fewer (each used as evenly as possible, as the reference),
    ``perm`` indexing them.
    """
    num_global = len(teacher_global)
    num_crops = len(student_crops)
    gather = gather or BatchGather()
    teacher_steepness = steepness if teacher_steepness is None else teacher_steepness
    boxes_g, boxes_c = overlap_boxes(crop_boxes, crop_sizes, num_global)
    pairs = pair_order(num_global, num_crops)
    if ref_indices is not None and len(ref_indices) != len(pairs):
        raise ValueError(f"ref_indices needs one permutation per crop pair ({len(pairs)}), got {len(ref_indices)}")
    if references is not None and len(references) != num_global:
        raise ValueError(f"references needs one bank per global crop ({num_global}), got {len(references)}")
    if masks is not None and len(masks) != num_global:
        raise ValueError(f"masks needs one token mask per global crop ({num_global}), got {len(masks)}")
    n = ROI_SIZE * ROI_SIZE

    def student_ranks(s: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        return neighbor_ranks(s, refs, steepness, network, similarity)

    total = 0.0
    for p, (c, v) in enumerate(pairs):
        with torch.no_grad():
            t = align(teacher_global[c].detach(), boxes_g[:, c, v], patch_size)  # (B, 49, D)
        s = align(student_crops[v], boxes_c[:, v, c], patch_size)
        batch, _, dim = t.shape
        source = gather.fn(t.reshape(batch * n, dim)) if references is None else references[c].detach()
        count = source.shape[0] if references is None else (gather.total or batch) * n
        keep = None
        if masks is not None:
            keep = aligned_mask(masks[c], boxes_g[:, c, v], patch_size)
            selected = gather.fn(keep.float()).reshape(-1) > 0
            if not selected.any():
                continue
            if references is None:
                source = source[selected]
        tile = masks is not None and references is None
        perm = ref_indices[p] if ref_indices is not None else _draw(source.shape[0], count, t.device, tile)
        refs = source[perm[gather.offset * n : (gather.offset + batch) * n]].reshape(batch, n, dim).to(s.dtype)
        with torch.no_grad():
            target = neighbor_ranks(t, refs, teacher_steepness, network, similarity)
        if checkpoint_sort and torch.is_grad_enabled():
            pred = checkpoint(student_ranks, s, refs, use_reentrant=False)
        else:
            pred = student_ranks(s, refs)
        if keep is None:
            total = total + rank_cross_entropy(target, pred)
        else:  # this process's share of the mean over the whole batch's selected locations (processes: equal shards)
            share = keep.sum() * (gather.total or batch) / (batch * selected.sum())
            total = total + rank_cross_entropy(target, pred, keep) * share
    if not torch.is_tensor(total):  # the masks selected no location in any pair
        return student_crops[0].new_zeros(())
    return total / len(pairs)
