import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sharelock.losses import LOGIT_SCALE, clip_loss
from sharelock.models import ProjectionHead, ShareLock


def manual_head(x, linears, bns, normalize=True, train=False):
    """The reference block by hand: (Linear, BN, ReLU)^(L-1), Linear; BN with explicit statistics."""
    for lin, bn in zip(linears[:-1], bns):
        x = x @ lin.weight.t() + lin.bias
        if train:
            mean, var = x.mean(0), x.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        x = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        x = torch.clamp(x, min=0)
    x = x @ linears[-1].weight.t() + linears[-1].bias
    return x / torch.sqrt((x * x).sum(-1, keepdim=True)) if normalize else x


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_head_layout_and_eval_forward(layers):
    torch.manual_seed(layers)
    head = ProjectionHead(6, 5, hidden_dim=7, num_layers=layers)
    mods = [m for m in head.modules() if isinstance(m, nn.Linear | nn.BatchNorm1d | nn.ReLU | nn.Dropout)]
    expected = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * (layers - 1) + [nn.Linear]
    assert [type(m) for m in mods] == expected
    assert all(m.p == 0.2 for m in mods if isinstance(m, nn.Dropout))
    linears = [m for m in mods if isinstance(m, nn.Linear)]
    bns = [m for m in mods if isinstance(m, nn.BatchNorm1d)]
    for bn in bns:  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(9, 6)
    head.eval()
    out = head(x)
    assert out.shape == (9, 5)
    torch.testing.assert_close(out, manual_head(x, linears, bns), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(9))


def test_head_train_mode_batchnorm_statistics():
    torch.manual_seed(0)
    head = ProjectionHead(4, 3, hidden_dim=5, num_layers=2, dropout=0.0)
    bn = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)][0]
    lin = [m for m in head.modules() if isinstance(m, nn.Linear)]
    x = torch.randn(8, 4)
    head.train()
    out = head(x)
    torch.testing.assert_close(out, manual_head(x, lin, [bn], train=True), atol=1e-5, rtol=1e-5)
    pre = x @ lin[0].weight.t() + lin[0].bias
    # running stats: momentum 0.1 towards the batch mean and the *unbiased* batch variance
    torch.testing.assert_close(bn.running_mean, 0.1 * pre.mean(0).detach())
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * pre.var(0, unbiased=True).detach())


def test_head_identity_and_unnormalised():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(ProjectionHead(2, 99, num_layers=0)(x), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(ProjectionHead(2, 99, num_layers=0, normalize=False)(x), x)
    assert ProjectionHead(2, 99, num_layers=0).output_dim == 2


def test_sharelock_embedding_dim_rule_and_param_count():
    m = ShareLock(vision_dim=12, text_dim=20, text_layers=3, hidden_dim=16, vision_layers=0, embedding_dim=999)
    zv, zt = m(torch.randn(5, 12), torch.randn(5, 20))
    assert zv.shape == zt.shape == (5, 12)
    torch.testing.assert_close(zv.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(zt.norm(dim=-1), torch.ones(5))
    m2 = ShareLock(vision_dim=12, text_dim=20, text_layers=2, hidden_dim=16, vision_layers=2, embedding_dim=7)
    assert [t.shape for t in m2(torch.randn(5, 12), torch.randn(5, 20))] == [(5, 7), (5, 7)]
    # spec: vision dim 768, text 4096, 4 layers, hidden 4096 -> 3 x (Linear 4096^2 + BN) + Linear(4096, 768)
    ref = ShareLock(768, 4096)
    expected = 3 * (4096 * 4096 + 4096 + 2 * 4096) + 4096 * 768 + 768
    assert sum(p.numel() for p in ref.parameters()) == expected


def test_zero_shot_logits_hand_case():
    # identity heads (text_layers=0) make the expected cosines easy to write down
    m = ShareLock(vision_dim=2, text_dim=2, text_layers=0)
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    classes = torch.tensor([[0.0, 5.0], [3.0, 0.0]])
    logits = m.zero_shot_logits(v, classes)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(logits, torch.tensor([[0.0, 1.0], [1.0, 0.0], [s, s]]))
    labels = torch.tensor([1, 0, 0])
    assert (logits.argmax(1) == labels).float().mean().item() == 1.0


def test_zero_shot_logits_uses_eval_mode_and_restores_training():
    torch.manual_seed(0)
    m = ShareLock(vision_dim=4, text_dim=6, text_layers=2, hidden_dim=8)
    m.train()
    v, c = torch.randn(3, 4), torch.randn(5, 6)
    a = m.zero_shot_logits(v, c)
    assert m.training
    m.eval()
    expected = F.normalize(v, dim=-1) @ m.text_head(c).t()
    torch.testing.assert_close(a, expected)
    assert a.shape == (3, 5)


def test_clip_loss_hand_case_and_properties():
    # B=1: a 1x1 softmax always gives probability 1
    assert clip_loss(torch.randn(1, 4), torch.randn(1, 4)).item() == pytest.approx(0.0, abs=1e-7)
    # B=2, rows 0.3*e_i: logits 0.09*s*I -> each CE = log(1 + e^{-0.09 s}), identical for rows and columns
    eye = torch.eye(2)
    s = math.exp(2.6592)
    assert clip_loss(0.3 * eye, 0.3 * eye).item() == pytest.approx(math.log1p(math.exp(-0.09 * s)), rel=1e-5)
    assert LOGIT_SCALE == pytest.approx(s, rel=1e-6)
    # a non-symmetric case against a by-hand softmax in float64
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    logits = (s * a @ b.t()).double()

    def ce(m):
        return -sum(m[i, i] - torch.logsumexp(m[i], 0) for i in range(2)) / 2

    assert clip_loss(a, b).item() == pytest.approx(0.5 * (ce(logits) + ce(logits.t())).item(), rel=1e-5)
    # symmetric in its two inputs; custom scale
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    torch.testing.assert_close(clip_loss(x, y), clip_loss(y, x))
    assert clip_loss(eye, eye, logit_scale=1.0).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-5)
    with pytest.raises(ValueError, match="equal shape"):
        clip_loss(torch.randn(2, 3), torch.randn(3, 3))


def test_clip_loss_gradient_matches_closed_form():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_(True)
    b = F.normalize(torch.randn(4, 3), dim=-1)
    clip_loss(a, b).backward()
    s = LOGIT_SCALE
    logits = s * a.detach() @ b.t()
    p_rows, p_cols = logits.softmax(1), logits.t().softmax(1)
    eye = torch.eye(4)
    # dL/da = s/(2B) [(P_rows - I) b + (P_cols - I)^T b]
    grad = s / 8 * ((p_rows - eye) @ b + (p_cols - eye).t() @ b)
    torch.testing.assert_close(a.grad, grad, atol=1e-5, rtol=1e-4)


def test_embedding_dim_when_only_the_text_head_is_identity():
    m = ShareLock(vision_dim=6, text_dim=4, text_layers=0, vision_layers=2, hidden_dim=8, embedding_dim=99)
    assert m.embedding_dim == 4
    assert [t.shape for t in m(torch.randn(3, 6), torch.randn(3, 4))] == [(3, 4), (3, 4)]
    with pytest.raises(ValueError, match="two identity heads"):
        ShareLock(vision_dim=6, text_dim=4, text_layers=0, vision_layers=0)


def test_reference_weight_layout_converts():
    from sharelock.models import from_reference_state_dict

    torch.manual_seed(0)
    # the official layout: Projection.projection = Sequential(Linear, BN, ReLU, Dropout, ..., Linear)
    ref = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 6)).eval()
    ref[1].running_mean.uniform_(-1, 1)
    state = {f"language_projector.projection.{k}": v for k, v in ref.state_dict().items()}
    m = ShareLock(vision_dim=6, text_dim=10, text_layers=2, hidden_dim=8)
    m.load_state_dict(from_reference_state_dict(state))
    x = torch.randn(4, 10)
    torch.testing.assert_close(m.eval().text_head(x), F.normalize(ref(x), dim=-1))
