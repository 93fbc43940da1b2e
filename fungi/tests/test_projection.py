import math

import torch

import fungi.projection as projection
from fungi.projection import project, random_projection


def test_random_projection_is_the_reference_construction():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    p = random_projection(7, 50, seed=42)
    after = torch.rand(3)
    assert torch.equal(before, after)  # global RNG untouched
    torch.manual_seed(42)
    ref = torch.where(torch.rand(7, 50) > 0.5, 1.0, -1.0)
    assert torch.equal(p, ref)
    assert set(p.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(p, random_projection(7, 50, seed=43))


def test_project_chunked_int8_matches_dense(monkeypatch):
    monkeypatch.setattr(projection, "PROJECTION_CHUNK", 16)
    p = random_projection(6, 5 * 11, seed=0)
    grads = torch.randn(3, 5, 11)
    ours = project(grads, p.to(torch.int8))
    ref = grads.reshape(3, -1) @ p.T / math.sqrt(6)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(project(grads, p, scale=2.0), 2 * grads.reshape(3, -1) @ p.T, atol=1e-5)
