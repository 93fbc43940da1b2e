import math

import pytest
import torch
import torch.nn.functional as F

from fungi.losses import dino_loss, dino_per_sample, kl_uniform_loss, simclr_loss


@pytest.mark.filterwarnings("ignore:reduction")
@pytest.mark.parametrize("temperature", [1.0, 15.0])
def test_kl_matches_torch_kl_div_value_and_gradient(temperature):
    latents = torch.randn(5, 768, requires_grad=True)
    ref = F.kl_div(F.log_softmax(latents / temperature, -1), torch.full((5, 768), 1 / 768), reduction="mean")
    ours = kl_uniform_loss(latents, temperature)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-9)
    (g_ref,) = torch.autograd.grad(ref, latents)
    (g_ours,) = torch.autograd.grad(ours, latents)
    assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-10)


def test_kl_hand_case_and_uniform_limit():
    # two classes, p = softmax([log 3, 0]) = (3/4, 1/4); KL(u||p) = 1/2 (log(1/2 / 3/4) + log(1/2 / 1/4)); "mean" / 2
    latents = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.5 * (math.log(0.5 / 0.75) + math.log(0.5 / 0.25)) / 2
    assert kl_uniform_loss(latents, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert kl_uniform_loss(torch.full((3, 10), 7.0)).item() == pytest.approx(0.0, abs=1e-7)


def test_dino_matches_pairwise_loop_and_hand_case():
    student, teacher = torch.randn(3, 12, 16), torch.randn(3, 2, 16)
    total = torch.zeros(3)
    for g in range(2):
        for v in range(12):
            p = torch.softmax(teacher[:, g] / 0.07, -1)
            total += -(p * torch.log_softmax(student[:, v] / 0.1, -1)).sum(-1)
    assert torch.allclose(dino_loss(student, teacher), total.mean(), rtol=1e-5)
    assert torch.allclose(dino_per_sample(student, teacher), total, rtol=1e-5)  # same default temperatures
    # hand case: uniform teacher, 1 teacher view, 1 student view with logits [0, log 3 * 0.1]:
    # q = (1/4, 3/4), CE = -(1/2 log 1/4 + 1/2 log 3/4)
    s = torch.tensor([[[0.0, math.log(3.0) * 0.1]]])
    t = torch.zeros(1, 1, 2)
    assert dino_loss(s, t).item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)


def test_dino_teacher_gets_no_gradient():
    student = torch.randn(2, 4, 8, requires_grad=True)
    teacher = torch.randn(2, 2, 8, requires_grad=True)
    dino_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def _simclr_reference(views, negatives, tau, variant):
    """Literal re-derivation of the reference computation, one sample at a time."""
    losses = []
    for sample in views:
        v = sample.shape[0]
        feats = F.normalize(torch.cat([negatives, sample]), dim=-1)
        sim = F.cosine_similarity(feats[-v:, None, :], feats[None, :, :], dim=-1)
        sim = torch.diagonal_scatter(sim, torch.full((v,), -10000.0), sim.shape[1] - v)
        pos = sim[:, -v:] / tau
        if variant == "library":
            # the library subtracts the diagonal as a broadcast row vector, which adds (V-1) * 10000 / tau
            nll = -(pos - torch.diag(pos)).sum(1) / (v - 1) + torch.logsumexp(sim, -1)
        else:
            off = pos.masked_fill(torch.eye(v, dtype=torch.bool), 0.0).sum(1) / (v - 1)
            nll = -off + torch.logsumexp(sim / tau, -1)
        losses.append(nll.mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("variant", ["paper", "library"])
def test_simclr_matches_reference_loop(variant):
    views, negatives = torch.randn(3, 6, 16), torch.randn(20, 16)
    ours = simclr_loss(views, negatives, 0.07, variant)
    ref = _simclr_reference(views, negatives, 0.07, variant)
    assert torch.allclose(ours, ref, rtol=1e-5)


def test_simclr_library_constant_shift():
    views, negatives = torch.randn(2, 49, 96), torch.randn(64, 96)
    lib = simclr_loss(views, negatives, variant="library").item()
    assert -1.45e5 < lib < -1.40e5  # -10000 / 0.07 = -142857 plus O(1) terms
    # identical views and orthogonal negatives: pos = 1/tau and the logsumexp has V-1 terms equal to 1
    same = F.one_hot(torch.zeros(1, 4, dtype=torch.long), 8).float()
    negs = F.one_hot(torch.arange(1, 8), 8).float()
    expected = -1 / 0.07 + math.log(3 * math.exp(1 / 0.07) + 7)
    assert simclr_loss(same, negs, 0.07, "paper").item() == pytest.approx(expected, rel=1e-5)


def test_simclr_bad_variant():
    with pytest.raises(ValueError, match="variant"):
        simclr_loss(torch.randn(1, 2, 4), torch.randn(3, 4), variant="vision")
