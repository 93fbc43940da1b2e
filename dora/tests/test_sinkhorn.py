import math

import pytest
import torch

from dora.sinkhorn import sinkhorn_knopp


def reference_sinkhorn(logits, epsilon=0.05, num_iters=30):
    """The official float32 procedure, written out per sample."""
    outs = []
    for s in logits.float():
        q = torch.exp((s - s.max()) / epsilon).t()  # (K, N)
        q = q / q.sum()
        k, n = q.shape
        for _ in range(num_iters):
            q = q / q.sum(dim=1, keepdim=True) / k
            q = q / q.sum(dim=0, keepdim=True) / n
        outs.append((q * n).t())
    return torch.stack(outs)


def test_marginals():
    torch.manual_seed(0)
    logits = torch.randn(3, 36, 3) * 0.1
    m = sinkhorn_knopp(logits)
    assert m.shape == (3, 36, 3)
    torch.testing.assert_close(m.sum(-1), torch.ones(3, 36))
    torch.testing.assert_close(m.sum(1), torch.full((3, 3), 12.0), atol=0.05, rtol=0)


def test_matches_reference_where_finite():
    torch.manual_seed(1)
    logits = torch.randn(4, 50, 3) * 0.05
    ref = reference_sinkhorn(logits)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(sinkhorn_knopp(logits), ref, atol=1e-5, rtol=1e-4)


def test_iteration_count_matches_reference_before_convergence():
    # far from convergence every iteration shows: num_iters is honoured exactly (not one more or one fewer)
    torch.manual_seed(3)
    logits = torch.randn(2, 12, 4) * 0.2
    for iters in (1, 2, 3):
        torch.testing.assert_close(
            sinkhorn_knopp(logits, num_iters=iters), reference_sinkhorn(logits, num_iters=iters), atol=1e-5, rtol=1e-4
        )
    assert (sinkhorn_knopp(logits, num_iters=1) - sinkhorn_knopp(logits, num_iters=2)).abs().max() > 1e-3


def test_hand_case_two_by_two():
    # symmetric 2x2 problem: the marginals already hold, so each patch gets softmax(S / eps)
    logits = torch.tensor([[[0.1, 0.0], [0.0, 0.1]]])
    e2 = math.exp(2.0)
    expected = torch.tensor([[[e2 / (1 + e2), 1 / (1 + e2)], [1 / (1 + e2), e2 / (1 + e2)]]])
    torch.testing.assert_close(sinkhorn_knopp(logits), expected)
    # equal logits: uniform assignment
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(2, 6, 3)), torch.full((2, 6, 3), 1 / 3))


def test_underflow_stays_finite():
    # prototype 2 of sample 1 is far below the max: exp(-40/0.05) underflows in float32 and the reference
    # turns the whole sample into NaN
    logits = torch.rand(2, 16, 3)
    logits[1, :, 2] = -40.0
    ref = reference_sinkhorn(logits)
    assert torch.isnan(ref[1]).all() and torch.isfinite(ref[0]).all()
    m = sinkhorn_knopp(logits)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m[1].sum(-1), torch.ones(16))
    assert m[1, :, 2].sum() > 1.0  # the balancing constraint still gives the weak prototype its share


def test_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, N, K\)"):
        sinkhorn_knopp(torch.zeros(4, 3))
