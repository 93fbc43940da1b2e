"""The fg / bg loss-mask ablation (``loss.mask``): attention masks, aligned selection, masked loss, training."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import ndimage
from torchvision.ops import roi_align

import neco.train as train_mod
from neco.crops import sample_crop_boxes
from neco.losses import aligned_mask, neco_loss, pair_order, rank_cross_entropy
from neco.masks import check_loss_mask, drop_specks, foreground_mask, keep_mass, token_masks
from neco.queue import PatchQueue
from neco.sorting import soft_sort
from neco.train import main

SIZES = [98, 98, 42, 42, 42, 42]


def _slow_foreground(attention, side):
    """One image: explicit reflect-padded 7x7 Gaussian (sigma 0.6), sorted cumulative mass, scipy labelling."""
    a = attention.double().reshape(side, side).numpy()
    g = np.exp(-(np.arange(-3, 4) ** 2) / (2 * 0.6**2))
    g /= g.sum()

    def reflect(i):
        return -i if i < 0 else 2 * (side - 1) - i if i >= side else i

    blurred = np.zeros((side, side))
    for y in range(side):
        for x in range(side):
            for dy in range(-3, 4):
                for dx in range(-3, 4):
                    blurred[y, x] += g[dy + 3] * g[dx + 3] * a[reflect(y + dy), reflect(x + dx)]
    flat = blurred.ravel()
    keep = np.zeros(side * side, dtype=bool)
    running = 0.0
    for i in sorted(range(side * side), key=lambda i: flat[i]):
        running += flat[i] / flat.sum()
        keep[i] = running > 0.4
    labels, _ = ndimage.label(keep.reshape(side, side), structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())
    return torch.from_numpy((labels > 0) & (sizes[labels] > 2)).reshape(-1)


def test_check_loss_mask():
    assert [check_loss_mask(m) for m in ("all", "fg", "bg")] == ["all", "fg", "bg"]
    with pytest.raises(ValueError, match="loss.mask='foreground': expected one of all, fg, bg"):
        check_loss_mask("foreground")
    with pytest.raises(ValueError, match="fg or bg, not 'all'"):
        token_masks([torch.rand(1, 16)], "all")


def test_keep_mass_hand_case():
    # ascending 0.1, 0.2, 0.3, 0.4: running shares 0.1, 0.3, 0.6, 1.0; > 1 - 0.6 keeps 0.3 and 0.4 (70 % of the mass)
    values = torch.tensor([[0.1, 0.4, 0.2, 0.3], [5.0, 1.0, 2.0, 2.5]])
    # row 2: ascending 1, 2, 2.5, 5 of 10.5: running shares 0.10, 0.29, 0.52, 1.0 keep 2.5 and 5
    expected = torch.tensor([[False, True, False, True], [True, False, False, True]])
    assert torch.equal(keep_mass(values), expected)
    assert torch.equal(keep_mass(values * 7), expected)  # only shares of the mass count


def test_drop_specks_hand_case_and_scipy():
    grid = [
        "#.....##",
        "......#.",  # L-triple (kept)
        "..#.....",  # diagonal pair with the next row (8-connected, size 2: dropped)
        "...#....",
        "........",
        "##....##",  # left: horizontal pair (dropped); right: 2x2 block (kept)
        "......##",
        "....#...",  # isolated (dropped); the top-left corner too
    ]
    mask = torch.tensor([[c == "#" for c in row] for row in grid])
    expected = torch.zeros_like(mask)
    expected[0, 6:8] = expected[1, 6] = True
    expected[5:7, 6:8] = True
    assert torch.equal(drop_specks(mask[None])[0], expected)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 9, 9, generator=gen) < 0.25
    for m, got in zip(masks, drop_specks(masks)):
        labels, _ = ndimage.label(m.numpy(), structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())
        assert torch.equal(got, torch.from_numpy((labels > 0) & (sizes[labels] > 2)))


def test_foreground_mask_hand_built_map():
    attention = torch.full((9, 9), 0.01)
    blob = [[1.0, 1.2, 1.1], [1.3, 1.6, 1.4], [1.2, 1.5, 1.3], [0.9, 1.1, 1.0]]
    attention[1:5, 1:4] = torch.tensor(blob)
    attention[7, 7] = 3.0  # an isolated bright location: kept by the mass rule, then dropped as a speck
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[1:4, 1:4] = True
    expected[4, 2:4] = True  # the blob minus its dimmest corner (0.9, blurred below the cut)
    got = foreground_mask(attention.reshape(1, -1))
    assert torch.equal(got.reshape(9, 9), expected)
    assert torch.equal(got[0], _slow_foreground(attention.reshape(-1), 9))


def test_foreground_mask_matches_slow_loop():
    gen = torch.Generator().manual_seed(1)
    for side in (5, 7, 12):
        attention = torch.rand(4, side, side, generator=gen) ** 4  # peaky, strictly positive, no ties
        attention = F.avg_pool2d(attention[:, None], 3, 1, 1)[:, 0].reshape(4, -1)  # smooth blobs
        got = foreground_mask(attention)
        for a, m in zip(attention, got):
            assert torch.equal(m, _slow_foreground(a, side)), side
    with pytest.raises(ValueError, match="at least 4 x 4 tokens, got 9"):
        foreground_mask(torch.rand(1, 9))


def test_fg_and_bg_split_the_token_grid():
    attention = torch.rand(3, 49, generator=torch.Generator().manual_seed(2))
    fg, bg = token_masks([attention], "fg")[0], token_masks([attention], "bg")[0]
    assert fg.dtype == torch.float32 and torch.equal(fg + bg, torch.ones(3, 49))
    assert 0 < fg.sum() < fg.numel()


def _slow_inside(mask_map, box):
    """Whether each of the 7x7 RoI-align bins of ``box`` (in tokens) reads only set tokens: every bilinear sample
    (aligned=True, adaptive sampling grid) must have all of its non-zero-weight neighbours set."""
    h, w = mask_map.shape
    x1, y1, x2, y2 = (float(v) - 0.5 for v in box)
    bin_h, bin_w = (y2 - y1) / 7, (x2 - x1) / 7
    grid_h, grid_w = math.ceil(bin_h), math.ceil(bin_w)
    out = torch.zeros(7, 7, dtype=torch.bool)

    def axis(v, size):
        v = max(v, 0.0)
        low = int(v)
        if low >= size - 1:
            return [size - 1]
        return [low] + ([low + 1] if v > low else [])

    for ph in range(7):
        for pw in range(7):
            ok = True
            for iy in range(grid_h):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    if y < -1 or y > h or x < -1 or x > w:
                        ok = False
                        continue
                    ok &= all(bool(mask_map[yy, xx]) for yy in axis(y, h) for xx in axis(x, w))
            out[ph, pw] = ok
    return out.reshape(-1)


def test_aligned_mask_selects_locations_wholly_inside():
    gen = torch.Generator().manual_seed(3)
    fg = (torch.rand(4, 49, generator=gen) < 0.6).float()
    bg = 1 - fg
    whole = torch.tensor([[0.0, 0.0, 98.0, 98.0]]).repeat(4, 1)  # the 7x7 grid itself: one location per token
    assert torch.equal(aligned_mask(fg, whole, 14), fg.bool())
    assert torch.equal(aligned_mask(fg, whole, 14) | aligned_mask(bg, whole, 14), torch.ones(4, 49, dtype=torch.bool))
    boxes = torch.cat([torch.rand(4, 2, generator=gen) * 40, 50 + torch.rand(4, 2, generator=gen) * 48], 1)
    inside_fg, inside_bg = aligned_mask(fg, boxes, 14), aligned_mask(bg, boxes, 14)
    assert not (inside_fg & inside_bg).any()  # straddling bins count for neither
    for b in range(4):
        assert torch.equal(inside_fg[b], _slow_inside(fg[b].reshape(7, 7), boxes[b] / 14))
    many = torch.cat([torch.rand(500, 2, generator=gen) * 60, 70 + torch.rand(500, 2, generator=gen) * 28], 1)
    assert aligned_mask(torch.ones(500, 49), many, 14).all()  # the reference's exact ">= 1.0" loses some of these


def test_masked_rank_cross_entropy_equals_loop_over_selected():
    gen = torch.Generator().manual_seed(4)
    teacher = torch.softmax(torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64), -1)
    student = torch.softmax(torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64), -1).requires_grad_()
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, False]])
    terms = [
        -(teacher[b, q, i] * student[b, q, i].log()).sum()
        for b in range(2)
        for q in range(5)
        if mask[b, q]
        for i in range(4)
    ]
    torch.testing.assert_close(rank_cross_entropy(teacher, student, mask), sum(terms) / len(terms))
    full = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(rank_cross_entropy(teacher, student, full), rank_cross_entropy(teacher, student))
    empty = rank_cross_entropy(teacher, student, torch.zeros(2, 5, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


def _batch(seed=0, batch=2, dim=6):
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.stack([sample_crop_boxes(140, 112, generator=gen) for _ in range(batch)]).double()
    tokens = [(batch, 49)] * 4 + [(batch, 9)] * 4
    teacher, student = [], []
    for i, shape in enumerate(tokens):
        (teacher if i < 2 else student).append(torch.randn(*shape, dim, dtype=torch.float64, generator=gen))
    masks = [(torch.rand(batch, 49, generator=gen) < 0.6).float() for _ in range(2)]
    return teacher, student, boxes, masks, gen


def _slow_masked_loss(teacher, student, boxes, masks, perms, banks=None, patch=14):
    """Per image, per pair: boxes from the textbook formula, the mask RoI-aligned like the features, references
    from the selected teacher patches (queue off) or a bank, cross-entropy summed over selected locations."""
    batch = boxes.shape[0]
    total = []
    for p, (c, v) in enumerate(pair_order(2, 6)):
        t_al, s_al, sel = [], [], []
        for b in range(batch):
            g, o = boxes[b, c], boxes[b, v]
            inter = torch.stack([max(g[0], o[0]), max(g[1], o[1]), min(g[2], o[2]), min(g[3], o[3])])
            in_g = SIZES[c] * (inter - g[[0, 1, 0, 1]]) / (g[2:] - g[:2])[[0, 1, 0, 1]]
            in_o = SIZES[v] * (inter - o[[0, 1, 0, 1]]) / (o[2:] - o[:2])[[0, 1, 0, 1]]
            side = int(student[v].shape[1] ** 0.5)
            rois_g, rois_o = [in_g[None] / patch], [in_o[None] / patch]
            t_al.append(roi_align(teacher[c][b].T.reshape(1, -1, 7, 7), rois_g, 7, aligned=True)[0].flatten(1).T)
            s_al.append(roi_align(student[v][b].T.reshape(1, -1, side, side), rois_o, 7, aligned=True)[0].flatten(1).T)
            m = roi_align(masks[c][b].double().reshape(1, 1, 7, 7), rois_g, 7, aligned=True)
            sel.append(m.reshape(-1) >= 1 - 1e-5)
        if not any(s.any() for s in sel):  # no location of the pair: it adds 0
            total.append(torch.zeros((), dtype=torch.float64))
            continue
        pooled = torch.cat(t_al)[torch.cat(sel)] if banks is None else banks[c]
        terms = []
        for b in range(batch):
            refs = pooled[perms[p][b * 49 : (b + 1) * 49]]
            ranks = []
            for feats in (t_al[b], s_al[b]):
                sims = F.normalize(feats, dim=-1) @ F.normalize(refs, dim=-1).T
                ranks.append(soft_sort(sims, "bitonic", 100.0)[1])
            for q in range(49):
                if sel[b][q]:
                    terms.append(-(ranks[0][q] * ranks[1][q].log()).sum(-1))  # (49 references)
        total.append(torch.cat(terms).mean())
    return torch.stack(total).mean()


def _pool_sizes(teacher, student, boxes, masks):
    """Selected locations per pair over the batch (the size of the queue-off reference pool)."""
    from neco.crops import overlap_boxes

    boxes_g, _ = overlap_boxes(boxes, SIZES, 2)
    return [int(aligned_mask(masks[c], boxes_g[:, c, v], 14).sum()) for c, v in pair_order(2, 6)]


def test_masked_neco_loss_matches_slow_loop():
    teacher, student, boxes, masks, gen = _batch()
    sizes = _pool_sizes(teacher, student, boxes, masks)
    assert min(sizes) > 0
    perms = [torch.randint(0, m, (98,), generator=gen) for m in sizes]
    fast = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms, masks=masks)
    torch.testing.assert_close(fast, _slow_masked_loss(teacher, student, boxes, masks, perms))
    banks = [torch.randn(150, 6, dtype=torch.float64, generator=gen) for _ in range(2)]
    perms = [torch.randperm(150, generator=gen)[:98] for _ in range(10)]
    fast = neco_loss(teacher, student, boxes, SIZES, 14, references=banks, ref_indices=perms, masks=masks)
    torch.testing.assert_close(fast, _slow_masked_loss(teacher, student, boxes, masks, perms, banks))


def test_masked_neco_loss_pairs_without_locations_add_zero():
    teacher, student, boxes, masks, gen = _batch(seed=1)
    masks[1] = torch.zeros_like(masks[1])  # nothing selected for the pairs of global crop 1
    perms = [torch.randint(0, max(m, 1), (98,), generator=gen) for m in _pool_sizes(teacher, student, boxes, masks)]
    fast = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms, masks=masks)
    torch.testing.assert_close(fast, _slow_masked_loss(teacher, student, boxes, masks, perms))
    none = [torch.zeros_like(m) for m in masks]
    assert neco_loss(teacher, student, boxes, SIZES, 14, masks=none).item() == 0.0
    with pytest.raises(ValueError, match="one token mask per global crop"):
        neco_loss(teacher, student, boxes, SIZES, 14, masks=masks[:1])


def test_all_is_the_unmasked_loss():
    """All-ones masks give the loss of ``loss.mask=all`` (masks=None); the next test pins the values of ``all``."""
    teacher, student, boxes, _, gen = _batch(seed=2)
    ones = [torch.ones(2, 49) for _ in range(2)]
    perms = [torch.randperm(98, generator=gen) for _ in range(10)]
    plain = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms)
    torch.testing.assert_close(neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms, masks=ones), plain)


def test_all_keeps_the_previous_values():
    """Values of the loss as computed before ``loss.mask`` existed (same inputs as test_losses' queue-off case)."""
    gen = torch.Generator().manual_seed(0)
    boxes = torch.stack([sample_crop_boxes(140, 112, generator=gen) for _ in range(2)]).double()
    sides = [7, 7, 7, 7, 3, 3, 3, 3]
    tokens = [torch.randn(2, s * s, 6, dtype=torch.float64, generator=gen) for s in sides]
    perms = [torch.randperm(98, generator=gen) for _ in range(10)]
    teacher, student = tokens[:2], tokens[2:]
    expected = 5.967327358916199
    torch.testing.assert_close(neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms).item(), expected)
    torch.manual_seed(0)
    expected = 5.9629962203544835  # references drawn from the global RNG
    torch.testing.assert_close(neco_loss(teacher, student, boxes, SIZES, 14).item(), expected)


def test_queue_pushes_only_masked_patches():
    q = PatchQueue(1, 8, 1)
    tokens = torch.arange(12.0).reshape(2, 6, 1)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]]).float()
    q.push_random(0, tokens, per_image=1, mask=mask)  # 2 images -> 2 of the 4 masked patches
    assert int(q.filled[0]) == 2 and set(q.banks()[0][:, 0].tolist()) <= {0.0, 2.0, 9.0, 10.0}
    q.push_random(0, tokens, per_image=3, mask=mask)  # 6 wanted, 4 available: all of them
    assert int(q.filled[0]) == 6 and sorted(q.banks()[0][:4, 0].tolist()) == [0.0, 2.0, 9.0, 10.0]


def test_cls_attention_matches_timms_explicit_attention():
    from neco.models import build_student_teacher, patch_tokens, tokens_and_attention

    cfg = {
        "name": "vit_small_patch14_reg4_dinov2",
        "pretrained": False,
        "checkpoint": None,
        "patch_size": 14,
        "drop_path": 0.0,
        "head_hidden_dim": 16,
        "head_out_dim": 8,
        "head_layers": 3,
        "overrides": {"img_size": 98, "depth": 2, "embed_dim": 48, "num_heads": 2},
    }
    torch.manual_seed(0)
    _, teacher = build_student_teacher(cfg)
    teacher.eval()
    images = torch.randn(3, 3, 70, 70)
    attn = teacher.backbone.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit softmax path; its attn_drop module sees the attention weights
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    tokens, cls = tokens_and_attention(teacher.backbone, images)
    handle.remove()
    weights = seen[-1]  # (B, heads, 1 + 4 registers + 25 patches, same)
    assert weights.shape == (3, 2, 30, 30)
    torch.testing.assert_close(cls, weights[:, :, 0, 5:].mean(1))
    torch.testing.assert_close(tokens, patch_tokens(teacher.backbone, images))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the teacher runs on GPU: the attention stays float32
        _, cls_bf16 = tokens_and_attention(teacher.backbone, images)
    assert cls_bf16.dtype == torch.float32
    torch.testing.assert_close(cls_bf16, cls, atol=0.02, rtol=0.05)  # only the block input saw bf16
    crops = [torch.randn(2, 3, 98, 98), torch.randn(2, 3, 98, 98), torch.randn(2, 3, 42, 42)]
    outputs, attentions = teacher(crops, attention=True)
    for plain, with_attention in zip(teacher(crops), outputs):
        assert torch.equal(plain, with_attention)
    assert [tuple(a.shape) for a in attentions] == [(2, 49), (2, 49), (2, 9)]


def _weights(ckpt):
    return {name: load_file(os.path.join(ckpt, f"{name}.safetensors")) for name in ("student", "teacher")}


@pytest.mark.parametrize("queue", ["true", "false"])
def test_train_with_fg_and_bg_masks(tiny_args, tmp_path, monkeypatch, queue):
    seen = {}
    real = train_mod.neco_loss

    def spy(*args, masks=None, **kwargs):
        seen.setdefault(run, []).append([m.clone() for m in masks])
        return real(*args, masks=masks, **kwargs)

    monkeypatch.setattr(train_mod, "neco_loss", spy)
    for run in ("fg", "bg"):
        args = [f"train.run_dir={tmp_path / run}", "optim.max_steps=2", f"loss.mask={run}", f"loss.use_queue={queue}"]
        out = main(tiny_args + args)
        assert len(out["losses"]) == 2 and all(math.isfinite(v) and v > 0 for v in out["losses"])
    fg, bg = seen["fg"][0], seen["bg"][0]  # step 1: same data and teacher, so complementary masks
    for f, b in zip(fg, bg):
        assert f.shape == (2, 49) and torch.equal(f + b, torch.ones_like(f)) and 0 < f.sum() < f.numel()


def test_train_skips_the_update_when_the_masks_select_nothing(tiny_args, monkeypatch):
    monkeypatch.setattr(train_mod, "token_masks", lambda attentions, mode: [torch.zeros_like(a) for a in attentions])
    args = ["optim.max_steps=2", "train.save_initial=true", "train.checkpoint_every=1", "loss.mask=fg"]
    out = main(tiny_args + args)
    assert out["losses"] == [0.0, 0.0]
    first = _weights(os.path.join(out["run_dir"], "checkpoints", "step_000000"))
    last = _weights(out["checkpoint"])
    for net in first:
        for key, value in first[net].items():
            assert torch.equal(value, last[net][key]), (net, key)


def test_train_rejects_an_unknown_mask(tiny_args):
    with pytest.raises(ValueError, match="loss.mask='foreground': expected one of all, fg, bg"):
        main(tiny_args + ["loss.mask=foreground"])
    with pytest.raises(ValueError, match=r"data.global_size=42 // model.patch_size=14 = 3"):
        main(tiny_args + ["loss.mask=fg", "data.global_size=42"])


def test_too_few_masked_patches_are_tiled_and_shuffled():
    """Fewer selected patches K than references N: each is used floor(N/K) or ceil(N/K) times (the reference tiles
    and shuffles); without ``tile`` (no masks) the old independent draws are kept."""
    from neco.losses import _draw

    torch.manual_seed(0)
    perm = _draw(7, 30, torch.device("cpu"), tile=True)
    assert sorted(torch.bincount(perm, minlength=7).tolist()) == [4, 4, 4, 4, 4, 5, 5]
    assert not torch.equal(perm, torch.arange(30) % 7)  # shuffled
    assert torch.equal(_draw(30, 30, torch.device("cpu"), tile=True).sort().values, torch.arange(30))
