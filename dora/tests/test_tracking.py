import math

import torch
import torch.nn.functional as F

from dora.sinkhorn import sinkhorn_knopp
from dora.tracking import choose_heads, track_and_mask

G, P, H, DH = 6, 4, 4, 3  # 6x6 patch grid, patch 4 px, 4 heads of dim 3
N, D = G * G, H * DH


def bands(shift: int) -> torch.Tensor:
    """(N,) object id of each patch: three vertical bands two columns wide, moved right by ``shift`` columns."""
    cols = (torch.arange(N) % G - shift) % G
    return cols // 2


def split_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, N+1, D) -> (B, h, N+1, dh)."""
    return x.reshape(x.shape[0], x.shape[1], H, DH).permute(0, 2, 1, 3)


def constructed_scene(T=2, B=1):
    feats = torch.eye(D)[:3]  # object i has feature e_i
    attn = torch.full((T, B, H, N + 1, N + 1), 1.0 / (N + 1))
    query = torch.zeros(T, B, H, N + 1, DH)
    key = torch.zeros(T, B, H, N + 1, DH)
    tokens = torch.zeros(T, B, N, D)
    for t in range(T):
        obj = bands(t)
        f = feats[obj]  # (N, D)
        tokens[t] = f
        merged_q = torch.cat([torch.zeros(1, D), f]).expand(B, -1, -1)
        query[t] = split_heads(merged_q)
        key[t] = split_heads(20 * merged_q)
    for i in range(3):  # head i's CLS attention covers object i in frame 0
        row = (bands(0) == i).float()
        attn[0, :, i, 0, 1:] = row / row.sum()
        attn[0, :, i, 0, 0] = 0
    return attn, query, key, tokens


def test_constructed_objects_are_found_and_tracked():
    T, B = 2, 1
    attn, query, key, tokens = constructed_scene(T, B)
    images = torch.ones(B, T, 3, G * P, G * P)
    heads = [2, 0, 1]
    out, inter = track_and_mask(attn, query, key, tokens, images, P, heads, return_intermediates=True)
    assert out.shape == (3, B, T, 3, G * P, G * P)
    for k, obj in enumerate(heads):
        for t in range(T):
            expected = (bands(t) == obj).float().reshape(G, G).repeat_interleave(P, 0).repeat_interleave(P, 1)
            torch.testing.assert_close(out[k, 0, t], expected.expand(3, -1, -1))
    assert inter["sk_input"].shape == (B, N, 3) and inter["sk_output"].shape == (B, N, 3)
    # SK assigns each patch to its own object's prototype
    assert (inter["sk_output"][0].argmax(-1) == torch.tensor([heads.index(o) for o in bands(0).tolist()])).all()


def reference_mot(attn, query, key, patch_tokens, images, patch_size, heads):
    """The official tracker as loops over frames and objects (batch-global mean threshold per frame and object)."""
    T, B = attn.shape[:2]
    gh, gw = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    q0 = query[0][:, :, 1:].permute(0, 2, 1, 3).flatten(2)
    protos = torch.einsum("bkn,bnd->bkd", attn[0][:, heads, 0, 1:], q0)
    z = patch_tokens[0] / patch_tokens[0].norm(dim=-1, keepdim=True)
    refined = sinkhorn_knopp(z @ protos.transpose(-2, -1)).transpose(-2, -1) @ z
    out = torch.zeros(len(heads), *images.shape)
    for t in range(T):
        k = key[t].permute(0, 2, 1, 3).flatten(2)[:, 1:]
        for i in range(len(heads)):
            tube = ((refined[:, i : i + 1] @ k.transpose(-2, -1)) * refined.shape[2] ** -0.5).softmax(-1)[:, 0]
            tube = tube / tube.norm(dim=-1, keepdim=True)
            tube = (tube > torch.mean(tube)).float().reshape(B, gh, gw)
            m = F.interpolate(tube.unsqueeze(1), scale_factor=patch_size, mode="nearest")
            out[i, :, t] = images[:, t] * m
    return out


def random_inputs(T: int, B: int, seed: int):
    """Softmaxed attention, queries, keys and patch tokens of T frames of a batch of B."""
    torch.manual_seed(seed)
    attn = torch.rand(T, B, H, N + 1, N + 1).softmax(-1)
    query, key = torch.randn(T, B, H, N + 1, DH), torch.randn(T, B, H, N + 1, DH)
    return attn, query, key, torch.randn(T, B, N, D)


def test_matches_reference_loops_on_random_inputs():
    T, B = 3, 2
    attn, query, key, tokens = random_inputs(T, B, seed=0)
    images = torch.randn(B, T, 3, G * P, G * P)
    heads = [3, 1, 0]
    torch.testing.assert_close(
        track_and_mask(attn, query, key, tokens, images, P, heads),
        reference_mot(attn, query, key, tokens, images, P, heads),
    )


def test_only_chosen_heads_matter():
    attn, query, key, tokens = constructed_scene()
    images = torch.randn(1, 2, 3, G * P, G * P)
    a = track_and_mask(attn, query, key, tokens, images, P, [0, 1])
    attn2 = attn.clone()
    attn2[:, :, 3] = torch.rand(N + 1, N + 1).softmax(-1)
    torch.testing.assert_close(track_and_mask(attn2, query, key, tokens, images, P, [0, 1]), a)


def test_choose_heads():
    import random

    heads = choose_heads(6, 3, random.Random(0))
    assert len(set(heads)) == 3 and all(0 <= h < 6 for h in heads)
    assert heads == choose_heads(6, 3, random.Random(0))


def test_intermediates_against_per_element_loops():
    # P = A0 Q0, S = Zn P^T, M = SK(S), P' = M^T Zn, tracks = softmax_N(P' K_t^T / sqrt(D)), masks thresholded at
    # the mean over the batch and patches of the L2-normalised tracks
    T, B = 2, 2
    attn, query, key, tokens = random_inputs(T, B, seed=2)
    heads = [1, 3, 2]
    _, inter = track_and_mask(
        attn, query, key, tokens, torch.randn(B, T, 3, G * P, G * P), P, heads, return_intermediates=True
    )

    def merged(x, t, b, n):  # heads concatenated along channels, token n + 1 (CLS skipped)
        return torch.cat([x[t, b, h, n + 1] for h in range(H)])

    protos = torch.zeros(B, 3, D)
    for b in range(B):
        for k, head in enumerate(heads):
            protos[b, k] = sum(attn[0, b, head, 0, n + 1] * merged(query, 0, b, n) for n in range(N))
    z = torch.stack([torch.stack([tokens[0, b, n] / tokens[0, b, n].norm() for n in range(N)]) for b in range(B)])
    sk_input = torch.tensor([[[float(z[b, n] @ protos[b, k]) for k in range(3)] for n in range(N)] for b in range(B)])
    torch.testing.assert_close(inter["prototypes"], protos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inter["sk_input"], sk_input, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inter["sk_output"], sinkhorn_knopp(sk_input), atol=1e-5, rtol=1e-4)
    m = inter["sk_output"]
    refined = torch.stack(
        [torch.stack([sum(m[b, n, k] * z[b, n] for n in range(N)) for k in range(3)]) for b in range(B)]
    )
    torch.testing.assert_close(inter["refined"], refined, atol=1e-5, rtol=1e-5)
    tracks = torch.zeros(T, B, 3, N)
    for t in range(T):
        for b in range(B):
            for k in range(3):
                logits = torch.stack([refined[b, k] @ merged(key, t, b, n) for n in range(N)]) / math.sqrt(D)
                tracks[t, b, k] = logits.softmax(0)
    torch.testing.assert_close(inter["tracks"], tracks, atol=1e-6, rtol=1e-4)
    normed = tracks / tracks.norm(dim=-1, keepdim=True)
    for t in range(T):
        for k in range(3):
            threshold = normed[t, :, k].mean()  # one threshold for the whole batch
            torch.testing.assert_close(inter["masks"][t, :, k], (normed[t, :, k] > threshold).float())
    assert 0 < inter["masks"].sum() < inter["masks"].numel()


def test_structureless_frame_gives_empty_masks():
    # identical keys in frame 1: every track is uniform, equal to its (batch, patch) mean, and the reference's strict
    # ">" leaves the masks empty; 4x4 grid so that 1/16 and its L2-normalised 1/4 are exact
    torch.manual_seed(4)
    T, B, g, n = 2, 2, 4, 16
    attn = torch.rand(T, B, H, n + 1, n + 1).softmax(-1)
    query, key, tokens = torch.randn(T, B, H, n + 1, DH), torch.randn(T, B, H, n + 1, DH), torch.randn(T, B, n, D)
    key[1] = 0.0
    images = torch.rand(B, T, 3, g * P, g * P) + 1.0
    out, inter = track_and_mask(attn, query, key, tokens, images, P, [0, 2], return_intermediates=True)
    torch.testing.assert_close(inter["tracks"][1], torch.full((B, 2, n), 1 / 16))
    assert inter["masks"][1].sum() == 0 and (out[:, :, 1] == 0).all()
    assert 0 < inter["masks"][0].sum() < inter["masks"][0].numel()  # frame 0 still has objects
