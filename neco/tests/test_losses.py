import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from neco.crops import sample_crop_boxes
from neco.losses import neco_loss, neighbor_ranks, pair_order, rank_cross_entropy
from neco.sorting import soft_sort

SIZES = [98, 98, 42, 42, 42, 42]


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_neighbor_ranks_hand_case_cosine():
    refs = torch.tensor([[_unit(0), _unit(90), _unit(180)]], dtype=torch.float64)  # cosines with e_x: 1, 0, -1
    query = torch.tensor([[[3.0, 0.0]]], dtype=torch.float64)  # scale must not matter
    ranks = neighbor_ranks(query, refs, steepness=1e8)
    assert ranks.shape == (1, 1, 3, 3)
    expected = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float64)  # ascending similarity
    torch.testing.assert_close(ranks[0, 0], expected, atol=1e-6, rtol=0)


def test_neighbor_ranks_hand_case_euclidean():
    refs = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    query = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64)  # distances 0, 3, 1 -> ranks 0, 2, 1
    ranks = neighbor_ranks(query, refs, steepness=1e8, similarity="euclidean")
    expected = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(ranks[0, 0], expected, atol=1e-6, rtol=0)


def test_neighbor_ranks_invariances():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen)
    r = torch.randn(2, 7, 8, dtype=torch.float64, generator=gen)
    ranks = neighbor_ranks(q, r, steepness=50.0)
    # positive rescaling of queries / references leaves cosine ranks unchanged
    torch.testing.assert_close(neighbor_ranks(2.5 * q, 0.3 * r, steepness=50.0), ranks)
    # a common rotation leaves cosines unchanged
    rot, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=gen))
    torch.testing.assert_close(neighbor_ranks(q @ rot, r @ rot, steepness=50.0), ranks)
    # rows: each reference is spread over ranks, columns: each rank receives total weight 1
    torch.testing.assert_close(ranks.sum(-1), torch.ones(2, 5, 7, dtype=torch.float64))
    torch.testing.assert_close(ranks.sum(-2), torch.ones(2, 5, 7, dtype=torch.float64))
    # the hard limit equals the rank of each reference in a plain argsort
    hard = neighbor_ranks(q, r, steepness=1e10)
    sims = torch.einsum("bqd,brd->bqr", F.normalize(q, dim=-1), F.normalize(r, dim=-1))
    rank_of = sims.argsort(-1).argsort(-1)
    torch.testing.assert_close(hard.argmax(-1), rank_of)


def test_rank_cross_entropy_hand_case_and_no_teacher_grad():
    teacher = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], requires_grad=True)
    student = torch.tensor([[[[0.5, 0.5], [0.25, 0.75]]]], requires_grad=True)
    loss = rank_cross_entropy(teacher, student)
    torch.testing.assert_close(loss, -(math.log(0.5) + math.log(0.75)) / 2 * torch.ones(()))
    loss.backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, torch.tensor([[[[-1 / 0.5, 0.0], [0.0, -1 / 0.75]]]]) / 2)


def _tokens(batch, side, dim, gen):
    return torch.randn(batch, side * side, dim, dtype=torch.float64, generator=gen)


def _batch(seed=0, batch=2, dim=6):
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.stack([sample_crop_boxes(140, 112, generator=gen) for _ in range(batch)]).double()
    teacher = [_tokens(batch, 7, dim, gen) for _ in range(2)]
    student = [_tokens(batch, 7, dim, gen) for _ in range(2)] + [_tokens(batch, 3, dim, gen) for _ in range(4)]
    perms = [torch.randperm(batch * 49, generator=gen) for _ in range(10)]
    return teacher, student, boxes, perms


def _slow_loss(
    teacher, student, boxes, perms, steepness, patch=14, banks=None, teacher_steepness=None, similarity="cosine"
):
    """Per image, per pair, with boxes from the textbook formula: the reference's loop structure."""
    batch = boxes.shape[0]
    total = []
    for p, (c, v) in enumerate(pair_order(2, 6)):
        t_al, s_al = [], []
        for b in range(batch):
            g, o = boxes[b, c], boxes[b, v]
            inter = torch.stack([max(g[0], o[0]), max(g[1], o[1]), min(g[2], o[2]), min(g[3], o[3])])
            in_g = SIZES[c] * (inter - g[[0, 1, 0, 1]]) / (g[2:] - g[:2])[[0, 1, 0, 1]]
            in_o = SIZES[v] * (inter - o[[0, 1, 0, 1]]) / (o[2:] - o[:2])[[0, 1, 0, 1]]
            tmap = teacher[c][b].T.reshape(1, -1, 7, 7)
            side = int(student[v].shape[1] ** 0.5)
            smap = student[v][b].T.reshape(1, -1, side, side)
            t_al.append(roi_align(tmap, [in_g[None] / patch], 7, aligned=True)[0].flatten(1).T)
            s_al.append(roi_align(smap, [in_o[None] / patch], 7, aligned=True)[0].flatten(1).T)
        pooled = torch.cat(t_al) if banks is None else banks[c]
        sub = []
        for b in range(batch):
            refs = pooled[perms[p][b * 49 : (b + 1) * 49]]
            ranks = []
            for feats, beta in ((t_al[b], teacher_steepness or steepness), (s_al[b], steepness)):
                if similarity == "cosine":
                    sims = F.normalize(feats, dim=-1) @ F.normalize(refs, dim=-1).T  # (49 queries, 49 refs)
                else:
                    sims = ((feats[:, None] - refs[None]) ** 2).sum(-1).sqrt()
                ranks.append(soft_sort(sims, "bitonic", beta)[1])
            sub.append(-(ranks[0] * ranks[1].log()).sum(-1).mean())
        total.append(torch.stack(sub).mean())
    return torch.stack(total).mean()


def test_neco_loss_matches_slow_loop_queue_off():
    teacher, student, boxes, perms = _batch()
    fast = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms, steepness=100.0)
    slow = _slow_loss(teacher, student, boxes, perms, 100.0)
    torch.testing.assert_close(fast, slow)


def test_neco_loss_matches_slow_loop_with_reference_banks():
    teacher, student, boxes, _ = _batch(seed=3)
    gen = torch.Generator().manual_seed(5)
    banks = [torch.randn(150, 6, dtype=torch.float64, generator=gen) for _ in range(2)]
    perms = [torch.randperm(150, generator=gen)[:98] for _ in range(10)]
    fast = neco_loss(teacher, student, boxes, SIZES, 14, references=banks, ref_indices=perms, steepness=30.0)
    slow = _slow_loss(teacher, student, boxes, perms, 30.0, banks=banks)
    torch.testing.assert_close(fast, slow)


@pytest.mark.parametrize("teacher_steepness,similarity", [(1000.0, "cosine"), (None, "euclidean")])
def test_neco_loss_teacher_steepness_and_similarity_match_slow_loop(teacher_steepness, similarity):
    """loss.teacher_steepness sharpens the teacher's ranks only; loss.similarity applies to teacher and student."""
    teacher, student, boxes, perms = _batch(seed=7)
    kwargs = dict(teacher_steepness=teacher_steepness, similarity=similarity)
    fast = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms, steepness=30.0, **kwargs)
    slow = _slow_loss(teacher, student, boxes, perms, 30.0, **kwargs)
    torch.testing.assert_close(fast, slow)
    assert not torch.isclose(fast, _slow_loss(teacher, student, boxes, perms, 30.0))  # the options matter here


def test_gradients_reach_only_the_student():
    teacher, student, boxes, perms = _batch(seed=1)
    teacher = [t.float().requires_grad_(True) for t in teacher]
    student = [s.float().requires_grad_(True) for s in student]
    loss = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms)
    loss.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 for s in student)
    # checkpointed sort gives the same gradients
    student2 = [s.detach().clone().requires_grad_(True) for s in student]
    loss2 = neco_loss(teacher, student2, boxes, SIZES, 14, ref_indices=perms, checkpoint_sort=True)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    for a, b in zip(student, student2):
        torch.testing.assert_close(a.grad, b.grad)


def test_loss_is_teacher_entropy_when_student_equals_teacher():
    # constant maps per image: every aligned location of teacher and student is the same vector
    gen = torch.Generator().manual_seed(2)
    _, _, boxes, perms = _batch(seed=2)
    vec = torch.randn(2, 1, 6, dtype=torch.float64, generator=gen)
    teacher = [vec.expand(2, 49, 6)] * 2
    student = [vec.expand(2, 49, 6)] * 2 + [vec.expand(2, 9, 6)] * 4
    loss = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms)
    entropy = 0.0
    for perm in perms:  # one reference draw per crop pair
        refs = vec.reshape(2, 6).repeat_interleave(49, 0)[perm].reshape(2, 49, 6)
        ranks = neighbor_ranks(vec.expand(2, 49, 6), refs)
        entropy = entropy + -(ranks * ranks.log()).sum(-1).mean() / len(perms)
    torch.testing.assert_close(loss, entropy)
    # any other student is worse (Gibbs' inequality)
    noisy = [s + 0.3 * torch.randn(s.shape, dtype=torch.float64, generator=gen) for s in student]
    assert neco_loss(teacher, noisy, boxes, SIZES, 14, ref_indices=perms) > loss


def test_loss_is_invariant_to_feature_scale():
    teacher, student, boxes, perms = _batch(seed=4)
    a = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms)
    b = neco_loss([2 * t for t in teacher], [0.5 * s for s in student], boxes, SIZES, 14, ref_indices=perms)
    torch.testing.assert_close(a, b)


def test_loss_bad_ref_indices():
    teacher, student, boxes, perms = _batch()
    with pytest.raises(ValueError, match="one permutation per crop pair"):
        neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms[:3])


def test_neco_loss_student_gradients_match_slow_loop():
    """Spec 12.5: the gradients w.r.t. the student embeddings, not only the loss value, equal the slow loop's."""
    teacher, student, boxes, perms = _batch(seed=6)
    fast_in = [s.clone().requires_grad_(True) for s in student]
    slow_in = [s.clone().requires_grad_(True) for s in student]
    fast = neco_loss(teacher, fast_in, boxes, SIZES, 14, ref_indices=perms, steepness=100.0)
    slow = _slow_loss(teacher, slow_in, boxes, perms, 100.0)
    fast_grads = torch.autograd.grad(fast, fast_in)
    slow_grads = torch.autograd.grad(slow, slow_in)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(fast_grads, slow_grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)


def test_neighbor_ranks_under_bf16_autocast_stay_float32_and_positive():
    # GPU training runs bf16 autocast: the similarity einsum would be cast to bf16 and the soft sort in bf16 rounds
    # comparator weights to exactly 0, so log(ranks) = -inf in the loss. The ranks must be computed in float32.
    gen = torch.Generator().manual_seed(0)
    q, r = torch.randn(2, 49, 16, generator=gen), torch.randn(2, 49, 16, generator=gen)
    expected = neighbor_ranks(q, r)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ranks = neighbor_ranks(q, r)
    assert ranks.dtype == torch.float32 and (ranks > 0).all()
    torch.testing.assert_close(ranks, expected)
    assert neighbor_ranks(q.bfloat16(), r.bfloat16()).dtype == torch.float32


def test_neco_loss_finite_under_bf16_autocast_and_for_bf16_tokens():
    teacher, student, boxes, perms = _batch(seed=2, dim=16)
    teacher, student = [t.float() for t in teacher], [s.float().requires_grad_(True) for s in student]
    expected = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms)
    for checkpoint_sort in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = neco_loss(teacher, student, boxes, SIZES, 14, ref_indices=perms, checkpoint_sort=checkpoint_sort)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, expected)
        loss.backward()
        assert all(torch.isfinite(s.grad).all() for s in student)
    # bf16 head outputs used without .float(): roi_align has no bf16 kernel, the loss aligns them in float32
    loss = neco_loss(
        [t.bfloat16() for t in teacher], [s.bfloat16() for s in student], boxes, SIZES, 14, ref_indices=perms
    )
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, atol=0.05, rtol=0.02)
