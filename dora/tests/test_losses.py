import math

import pytest
import torch
import torch.nn.functional as F

from dora.losses import DINOLoss, DoRALoss


def reference_loss(student_local, student_masked, teacher, center, temp, num_local, student_temp=0.1):
    """The official nested loops (per object, per frame, per crop chunk) with the carried-over accumulator."""
    frame_loss, total = 0.0, 0.0
    T = teacher.shape[0]
    for j in range(len(student_masked)):
        for t in range(T):
            s_loc = (student_local[t] / student_temp).chunk(num_local)
            s_m = student_masked[j][t] / student_temp
            q = F.softmax((teacher[t] - center) / temp, dim=-1)
            masked = torch.sum(-q * F.log_softmax(s_m, dim=-1), dim=-1).mean()
            local, n = 0.0, 0
            for v in range(len(s_loc)):
                if v == 0:
                    continue
                local = local + torch.sum(-q * F.log_softmax(s_loc[v], dim=-1), dim=-1).mean()
                n += 1
            frame_loss = frame_loss + (masked + local / n) * 0.5
        frame_loss = frame_loss / T
        total = total + frame_loss
    return total / len(student_masked)


def test_hand_case():
    loss_fn = DoRALoss(out_dim=2, num_local_crops=2)
    teacher = torch.zeros(1, 1, 2)  # uniform teacher
    masked = torch.tensor([0.1, 0.0]).view(1, 1, 1, 2)  # student logits [1, 0] after /0.1
    local = torch.tensor([[[5.0, -3.0], [0.0, 0.0]]])  # crop 0 (skipped), crop 1 uniform
    expected = 0.5 * ((0.5 + math.log(1 + math.exp(-1))) + math.log(2))
    assert loss_fn(local, masked, teacher, 0).item() == pytest.approx(expected, rel=1e-6)
    local[0, 0] = torch.tensor([-7.0, 9.0])  # crop 0 is ignored by the reference reduction
    assert loss_fn(local, masked, teacher, 0).item() == pytest.approx(expected, rel=1e-6)


def test_carried_accumulator_hand_value():
    # every cross-entropy equals log D: l_jt = c for all j, t. K = 2, T = 2: F1 = 2c/2 = c, F2 = (c + 2c)/2 = 1.5c
    D, K, T, B, L = 8, 2, 2, 3, 3
    c = math.log(D)
    args = (torch.zeros(T, L * B, D), torch.zeros(K, T, B, D), torch.zeros(T, B, D), 0)
    assert DoRALoss(D, L)(*args).item() == pytest.approx(1.25 * c, rel=1e-6)
    assert DoRALoss(D, L, loss_variant="clean")(*args).item() == pytest.approx(c, rel=1e-6)


def test_matches_reference_loops_and_updates_center():
    torch.manual_seed(0)
    D, K, T, B, L = 16, 3, 4, 2, 4
    loss_fn = DoRALoss(D, L, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, nepochs=5)
    center0 = torch.randn(1, D) * 0.1
    loss_fn.center.copy_(center0)
    local, masked, teacher = torch.randn(T, L * B, D), torch.randn(K, T, B, D), torch.randn(T, B, D)
    got = loss_fn(local, masked, teacher, epoch=1)
    ref = reference_loss(local, masked, teacher, center0, 0.055, L)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(loss_fn.center, 0.9 * center0 + 0.1 * teacher.reshape(-1, D).mean(0, keepdim=True))


def test_clean_variant_and_gradients():
    torch.manual_seed(1)
    D, K, T, B, L = 8, 2, 3, 2, 2
    local = torch.randn(T, L * B, D, requires_grad=True)
    masked, teacher = torch.randn(K, T, B, D, requires_grad=True), torch.randn(T, B, D)
    loss = DoRALoss(D, L, loss_variant="clean")(local, masked, teacher, 0)
    q = F.softmax(teacher / 0.04, -1)
    ce = lambda s: -(q * F.log_softmax(s / 0.1, -1)).sum(-1).mean(-1)  # noqa: E731
    loc = torch.stack([ce(local.reshape(T, L, B, D)[:, v]) for v in range(L)], 1).mean(1)
    expected = torch.stack([0.5 * (ce(masked[j]) + loc) for j in range(K)]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert local.grad.abs().sum() > 0 and masked.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_local_crops >= 2"):
        DoRALoss(8, 1)
    with pytest.raises(ValueError, match="loss_variant"):
        DoRALoss(8, 2, loss_variant="nope")
    with pytest.raises(ValueError, match="student_local"):
        DoRALoss(8, 2)(torch.zeros(1, 3, 8), torch.zeros(1, 1, 2, 8), torch.zeros(1, 2, 8), 0)


def test_dino_loss_hand_case_and_center():
    """G = 2 global views, one local crop, one sample, D = 2; teacher T 0.04, student T 0.1.

    Teacher view 0 = [1, 0] -> q0 = softmax([25, 0]) ~ [1, 0]; view 1 = [0, 0] -> q1 = [1/2, 1/2].
    Student probabilities: view 0 [1/2, 1/2], view 1 [1/4, 3/4], local [3/4, 1/4]. The four pairs (t0, v1),
    (t0, v2), (t1, v0), (t1, v2) cost ln 4, ln 4 - ln 3, ln 2, ln 4 - ln(3)/2: mean (7 ln 2 - 1.5 ln 3) / 4.
    """
    loss_fn = DINOLoss(out_dim=2, num_global_crops=2)
    ln3 = math.log(3)
    student = 0.1 * torch.tensor([[[0.0, 0.0]], [[0.0, ln3]], [[ln3, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    expected = (7 * math.log(2) - 1.5 * ln3) / 4
    assert loss_fn(student, teacher, 0).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.05, 0.0]]))  # 0.9 * 0 + 0.1 * mean of the teacher


def dino_reference_loss(student, teacher, center, temp, student_temp=0.1):
    """DINO's loops: every teacher global view against every student view but itself, batch means averaged."""
    total, n = 0.0, 0
    for iq, t in enumerate(teacher):
        q = F.softmax((t - center) / temp, dim=-1)
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s / student_temp, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_dino_loss_matches_reference_loops_with_gradients():
    torch.manual_seed(2)
    G, V, N, D = 2, 6, 5, 16
    loss_fn = DINOLoss(D, G, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, nepochs=5)
    center0 = torch.randn(1, D) * 0.1
    loss_fn.center.copy_(center0)
    student, teacher = torch.randn(V, N, D, requires_grad=True), torch.randn(G, N, D)
    got = loss_fn(student, teacher, epoch=1)
    assert got.item() == pytest.approx(dino_reference_loss(student, teacher, center0, 0.055).item(), rel=1e-5)
    torch.testing.assert_close(loss_fn.center, 0.9 * center0 + 0.1 * teacher.reshape(-1, D).mean(0, keepdim=True))
    got.backward()
    assert student.grad[2:].abs().sum() > 0 and student.grad[:2].abs().sum() > 0
    with pytest.raises(ValueError, match="num_global_crops >= 2"):
        DINOLoss(8, 1)
    with pytest.raises(ValueError, match="teacher_out"):
        loss_fn(torch.zeros(V, N, D), torch.zeros(3, N, D), 0)
