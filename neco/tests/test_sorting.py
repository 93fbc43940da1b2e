import math

import pytest
import torch

from neco.sorting import network_layers, soft_sort


def _relaxed_pair(a, b, steepness):
    alpha = math.atan(steepness * (b - a)) / math.pi + 0.5
    return alpha, 1 - alpha


def _loop_sort(row, layers, steepness):
    """One comparator at a time, plain Python floats: (values, weights[input][wire])."""
    n = len(row)
    vals = [float(v) for v in row]
    w = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for lo, hi in layers:
        for a, b in zip(lo, hi):
            al, be = _relaxed_pair(vals[a], vals[b], steepness)
            vals[a], vals[b] = al * vals[a] + be * vals[b], be * vals[a] + al * vals[b]
            for i in range(n):
                w[i][a], w[i][b] = al * w[i][a] + be * w[i][b], be * w[i][a] + al * w[i][b]
    return torch.tensor(vals, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)


def _recursive_bitonic(vals, weights, up, steepness):
    """Textbook recursive bitonic sort (n a power of two) with relaxed compare-exchange on (value, weights) lists."""
    n = len(vals)
    if n <= 1:
        return vals, weights
    h = n // 2
    v1, w1 = _recursive_bitonic(vals[:h], weights[:h], True, steepness)
    v2, w2 = _recursive_bitonic(vals[h:], weights[h:], False, steepness)
    return _bitonic_merge(v1 + v2, w1 + w2, up, steepness)


def _bitonic_merge(vals, weights, up, steepness):
    """Entries None are virtual wires: comparators touching them are skipped."""
    n = len(vals)
    if n <= 1:
        return vals, weights
    h = n // 2
    vals, weights = list(vals), list(weights)
    for i in range(h):
        lo, hi = (i, i + h) if up else (i + h, i)  # wire receiving the min, wire receiving the max
        if vals[lo] is None or vals[hi] is None:
            continue
        al, be = _relaxed_pair(vals[lo], vals[hi], steepness)
        xa, xb = vals[lo], vals[hi]
        wa, wb = weights[lo], weights[hi]
        vals[lo], vals[hi] = al * xa + be * xb, be * xa + al * xb
        weights[lo] = [al * p + be * q for p, q in zip(wa, wb)]
        weights[hi] = [be * p + al * q for p, q in zip(wa, wb)]
    v1, w1 = _bitonic_merge(vals[:h], weights[:h], up, steepness)
    v2, w2 = _bitonic_merge(vals[h:], weights[h:], up, steepness)
    return v1 + v2, w1 + w2


@pytest.mark.parametrize("steepness", [10.0, 100.0])
def test_bitonic_matches_textbook_recursion(steepness):
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values, perm = soft_sort(x, "bitonic", steepness)
    for m in range(3):
        eye = [[1.0 if i == j else 0.0 for i in range(8)] for j in range(8)]  # weights per wire over inputs
        v, w = _recursive_bitonic(x[m].tolist(), eye, True, steepness)
        torch.testing.assert_close(values[m], torch.tensor(v, dtype=torch.float64))
        torch.testing.assert_close(perm[m], torch.tensor(w, dtype=torch.float64).T)


def test_bitonic_49_is_the_64_wire_recursion_without_its_15_lowest_wires():
    # n = 49 (7 x 7 references): diffsort's layout, i.e. the textbook network on 64 wires with every comparator that
    # touches one of the 15 lowest (virtual) wires dropped; not the padded all-ascending form, which also sorts
    x = torch.randn(2, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    values, perm = soft_sort(x, "bitonic", 10.0)
    for m in range(2):
        eye = [[1.0 if i == j else 0.0 for i in range(49)] for j in range(49)]
        v, w = _recursive_bitonic([None] * 15 + x[m].tolist(), [None] * 15 + eye, True, 10.0)
        torch.testing.assert_close(values[m], torch.tensor(v[15:], dtype=torch.float64))
        torch.testing.assert_close(perm[m], torch.tensor(w[15:], dtype=torch.float64).T)


@pytest.mark.parametrize("network,n", [("bitonic", 49), ("bitonic", 22), ("odd_even", 7), ("odd_even", 49)])
def test_vectorised_equals_comparator_loop(network, n):
    x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    values, perm = soft_sort(x, network, 30.0)
    for m in range(2):
        v, w = _loop_sort(x[m].tolist(), network_layers(network, n), 30.0)
        torch.testing.assert_close(values[m], v)
        torch.testing.assert_close(perm[m], w)


def test_odd_even_network_shape():
    # n layers alternating even/odd pairs: 49 wires -> 49 layers of 24 comparators
    layers = network_layers("odd_even", 49)
    assert len(layers) == 49
    assert layers[0][0][:3] == (0, 2, 4) and layers[1][0][:3] == (1, 3, 5)
    assert all(len(lo) == 24 for lo, _ in layers)


def test_bitonic_49_has_21_layers_like_64_wires():
    assert len(network_layers("bitonic", 49)) == 21  # log2(64) * (log2(64) + 1) / 2


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
@pytest.mark.parametrize("n", [2, 5, 8, 22, 38, 49, 64])
def test_hard_limit_is_the_sort(network, n):
    gen = torch.Generator().manual_seed(n)
    # distinct values at least ~0.5 apart: the Cauchy tail leaks ~1 / (pi * beta * gap) per comparator
    x = torch.rand(16, n, generator=gen).argsort(1).double() + 0.5 * torch.rand(
        16, n, generator=gen, dtype=torch.float64
    )
    values, perm = soft_sort(x, network, steepness=1e9)
    torch.testing.assert_close(values, x.sort(1).values, atol=1e-6, rtol=0)
    hard = torch.zeros_like(perm).scatter_(1, x.argsort(1).unsqueeze(1), 1.0)  # hard[m, argsort[m, j], j] = 1
    torch.testing.assert_close(perm, hard, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
@pytest.mark.parametrize("n,steepness", [(8, 10.0), (8, 100.0), (49, 10.0), (49, 100.0)])
def test_doubly_stochastic_and_sorted_equals_x_at_p(dtype, network, n, steepness):
    x = torch.rand(32, n, dtype=dtype, generator=torch.Generator().manual_seed(2))
    values, perm = soft_sort(x, network, steepness)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    assert perm.dtype == dtype and (perm > 0).all()
    torch.testing.assert_close(perm.sum(1), torch.ones(32, n, dtype=dtype), **tol)
    torch.testing.assert_close(perm.sum(2), torch.ones(32, n, dtype=dtype), **tol)
    torch.testing.assert_close(torch.einsum("mi,mij->mj", x, perm), values, **tol)
    # relaxed values are ascending-ish: the relaxation only mixes neighbours, the mean is preserved
    torch.testing.assert_close(values.sum(1), x.sum(1), **tol)


def test_low_steepness_mixes_everything():
    # beta -> 0: every comparator averages its wires, so no entry of P stays one-hot
    x = torch.randn(4, 8, dtype=torch.float64)
    _, perm = soft_sort(x, "bitonic", 1e-9)
    assert perm.max() < 0.6


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
def test_gradcheck(network):
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_sort(t, network, 3.0)[1], (x,))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown sorting network 'quick'"):
        soft_sort(torch.randn(2, 4), "quick")
    with pytest.raises(ValueError, match=r"\(M, n\)"):
        soft_sort(torch.randn(4))
