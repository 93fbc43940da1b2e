import math

import pytest
import torch
from torch import nn

from pin.model import PositionalInsert, sincos_table


def test_sincos_table_against_the_formula():
    n, d = 7, 6
    table = sincos_table(n, d)
    assert table.shape == (n, d) and table.dtype == torch.float32
    for p in range(n):
        for j in range(d):
            angle = p / 10000 ** (2 * (j // 2) / d)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[p, j].item() == pytest.approx(expected, abs=1e-6)


def test_sincos_table_first_row_and_column_pair():
    t = sincos_table(300, 64)
    assert torch.equal(t[0, 0::2], torch.zeros(32)) and torch.equal(t[0, 1::2], torch.ones(32))
    # columns 0 and 1 share the frequency 1: sin^2 + cos^2 = 1
    assert torch.allclose(t[:, 0] ** 2 + t[:, 1] ** 2, torch.ones(300), atol=1e-6)


@pytest.mark.parametrize("n,d,count", [(256, 1024, 1_217_280), (257, 1408, 1_512_576)])
def test_parameter_counts_of_the_paper(n, d, count):
    pin = PositionalInsert(n, d)
    assert sum(p.numel() for p in pin.parameters()) == count
    # the same count from the layer sizes: Linear(64,512), LN(512), Linear(512,768), LN(768), Linear(768,d)
    assert (64 * 512 + 512) + 2 * 512 + (512 * 768 + 768) + 2 * 768 + (768 * d + d) == count
    assert pin.pos_enc.shape == (1, n, 64) and not pin.pos_enc.requires_grad


def test_learned_table_adds_its_entries():
    pin = PositionalInsert(10, 8, table_dim=4, hidden_dims=(6,), learned_table=True)
    fixed = PositionalInsert(10, 8, table_dim=4, hidden_dims=(6,))
    assert sum(p.numel() for p in pin.parameters()) - sum(p.numel() for p in fixed.parameters()) == 40
    assert pin.pos_enc.abs().max() <= math.sqrt(2 / 14)


def test_module_order():
    kinds = [type(m) for m in PositionalInsert(4, 8).modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.Linear, nn.LayerNorm, nn.Linear]


def test_forward_is_the_mlp_of_the_table():
    torch.manual_seed(0)
    pin = PositionalInsert(5, 3, table_dim=4, hidden_dims=(8, 6))
    lin1, _, ln1, lin2, _, ln2, lin3 = pin.mlp
    x = sincos_table(5, 4)
    h = ln1(torch.nn.functional.silu(x @ lin1.weight.T + lin1.bias))
    h = ln2(torch.nn.functional.silu(h @ lin2.weight.T + lin2.bias))
    expected = h @ lin3.weight.T + lin3.bias
    assert pin().shape == (1, 5, 3)
    assert torch.allclose(pin()[0], expected, atol=1e-6)


def test_add_to_broadcasts_over_leading_dims():
    pin = PositionalInsert(5, 3, table_dim=4, hidden_dims=(8,))
    x = torch.randn(2, 1, 1, 5, 3)  # OpenFlamingo's (B, T, F, N, D)
    out = pin.add_to(x)
    for b in range(2):
        assert torch.allclose(out[b, 0, 0], x[b, 0, 0] + pin()[0])
    with pytest.raises(ValueError, match="PIN expects"):
        pin.add_to(torch.randn(2, 6, 3))
