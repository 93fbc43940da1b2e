"""Object discovery and tracking with the teacher's last-block attention (DoRA, spec section b "Tracking")."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dora.sinkhorn import sinkhorn_knopp


def choose_heads(num_heads: int, num_objects: int, rng: random.Random | None = None) -> list[int]:
    """K distinct random head indices, shared by the whole batch and every frame (redrawn every iteration)."""
    if num_objects > num_heads:
        raise ValueError(f"num_objects={num_objects} needs at least as many attention heads, model has {num_heads}")
    return (rng or random).sample(range(num_heads), num_objects)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, dh) -> (B, N, h*dh), heads concatenated along the channel axis."""
    b, h, n, dh = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * dh)


@torch.no_grad()
def track_and_mask(
    attn: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    patch_tokens: torch.Tensor,
    images: torch.Tensor,
    patch_size: int,
    heads: Sequence[int],
    epsilon: float = 0.05,
    num_iters: int = 30,
    return_intermediates: bool = False,
):
    """Discover K objects in frame 0, track them through the clip and mask every frame with each object.

    attn (T, B, h, N+1, N+1) softmax attention of the teacher's last block (token 0 is CLS); query, key
    (T, B, h, N+1, dh) unscaled per-head projections; patch_tokens (T, B, N, h*dh) last-layer normed patch
    tokens; images (B, T, 3, S, S') normalised frames. Returns (K, B, T, 3, S, S') = images times binary masks;
    with ``return_intermediates`` also a dict with prototypes (B, K, D), sk_input (B, N, K), sk_output (B, N, K),
    refined (B, K, D), tracks (T, B, K, N) and masks (T, B, K, N).
    """
    T, B, h, n1, _ = attn.shape
    n = n1 - 1
    gh, gw = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    if gh * gw != n:
        raise ValueError(
            f"images {tuple(images.shape[-2:])} with patch {patch_size} give {gh * gw} patches, attn has {n}"
        )
    heads = list(heads)
    q0 = _merge_heads(query[0][:, :, 1:]).float()  # (B, N, D)
    a0 = attn[0][:, heads, 0, 1:].float()  # (B, K, N) CLS-to-patch attention of the chosen heads
    prototypes = a0 @ q0  # (B, K, D)
    z0 = patch_tokens[0].float()
    z0 = z0 / z0.norm(dim=-1, keepdim=True)
    sk_input = z0 @ prototypes.transpose(1, 2)  # (B, N, K)
    sk_output = sinkhorn_knopp(sk_input, epsilon=epsilon, num_iters=num_iters)
    refined = sk_output.transpose(1, 2) @ z0  # (B, K, D)
    d = refined.shape[-1]
    keys = torch.stack([_merge_heads(key[t][:, :, 1:]).float() for t in range(T)])  # (T, B, N, D)
    tracks = torch.softmax(torch.einsum("bkd,tbnd->tbkn", refined, keys) * d**-0.5, dim=-1)  # (T, B, K, N)
    tracks_n = tracks / tracks.norm(dim=-1, keepdim=True)
    # the reference thresholds each (frame, object) map at its mean over the whole batch and all patches
    threshold = tracks_n.mean(dim=(1, 3), keepdim=True)
    masks = (tracks_n > threshold).to(images.dtype)  # (T, B, K, N)
    pix = F.interpolate(masks.reshape(T * B, -1, gh, gw), scale_factor=patch_size, mode="nearest")
    pix = pix.reshape(T, B, -1, 1, gh * patch_size, gw * patch_size)
    out = torch.zeros(len(heads), *images.shape, dtype=images.dtype, device=images.device)
    crop = images[..., : gh * patch_size, : gw * patch_size]
    out[..., : gh * patch_size, : gw * patch_size] = crop.unsqueeze(0) * pix.permute(2, 1, 0, 3, 4, 5)
    if not return_intermediates:
        return out
    return out, {
        "prototypes": prototypes,
        "sk_input": sk_input,
        "sk_output": sk_output,
        "refined": refined,
        "tracks": tracks,
        "masks": masks,
    }
