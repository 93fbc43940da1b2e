import math

import pytest
import torch

from fungi.gradients import per_sample_gradients_loop
from fungi.patches import PatchFUNGI, pooled_token_infonce, project_token_gradients
from fungi.projection import random_projection
from fungi.tiny import tiny_timm


@pytest.mark.parametrize("bias", [True, False])
def test_token_projection_equals_projected_outer_products(bias):
    g, a = torch.randn(5, 3), torch.randn(5, 4)
    p = random_projection(6, 3 * (4 + bias), seed=0)
    outer = torch.einsum("to,ti->toi", g, torch.cat([a, torch.ones(5, 1)], 1) if bias else a).reshape(5, -1)
    projected = project_token_gradients(g, a, p.to(torch.int8), chunk=2, bias=bias)
    assert torch.allclose(projected, outer @ p.T / math.sqrt(6), atol=1e-5)


def test_pooled_infonce_library_is_paper_shifted_when_tau_is_one():
    z, n = torch.randn(4, 8), torch.randn(6, 8)
    lib = pooled_token_infonce(z, n, temperature=1.0, variant="library")
    paper = pooled_token_infonce(z, n, temperature=1.0, variant="paper")
    assert torch.allclose(lib, paper - 10000.0, atol=1e-2)


def test_pooled_infonce_hand_case():
    # tokens e1, e2 and one negative e1, tau = 1: S12 = 0, S1n = 1, S2n = 0, self-similarity -10000
    z, n = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    expected = (math.log(math.e + 1.0) + math.log(2.0)) / 2
    assert pooled_token_infonce(z, n, temperature=1.0, variant="paper").item() == pytest.approx(expected, rel=1e-6)


def test_pooled_infonce_matches_the_reference_formula_written_out():
    torch.manual_seed(0)
    n, tau = torch.randn(7, 8, dtype=torch.float64), 0.07
    z_ref = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    # reference layout: rows = the positives, columns = [negatives, positives], own column set to -10000,
    # positives' block / tau averaged without the diagonal, logsumexp over the raw row (no tau)
    feats = torch.nn.functional.normalize(torch.cat([n, z_ref]), dim=-1)
    own = torch.cat([torch.zeros(5, 7, dtype=torch.bool), torch.eye(5, dtype=torch.bool)], dim=1)
    cos = (feats[7:] @ feats.T).masked_fill(own, -10000.0)
    block = cos[:, 7:] / tau
    ref = (-(block.sum(1) - block.diagonal()) / 4 + torch.logsumexp(cos, dim=-1)).mean()
    ref.backward()
    z = z_ref.detach().float().requires_grad_(True)
    ours = pooled_token_infonce(z, n.float(), temperature=tau, variant="library")
    ours.backward()
    # the same loss up to the constant 10000 / tau (float32 cannot hold it to 1e-3), hence the same gradient
    assert ours.item() + 10000.0 / tau == pytest.approx(ref.item(), abs=0.02)
    assert torch.allclose(z.grad.double(), z_ref.grad, rtol=1e-4, atol=1e-6)


def test_negatives_pool_every_tokens_nearest_kept_rows():
    pf = PatchFUNGI(tiny_timm(), seed=1, latent_dim=8, num_negatives=2, negative_fraction=1.0)
    memory = torch.eye(48)[:6] * 3
    pf.set_memory(memory)
    tokens = torch.zeros(1, 2, 48)
    tokens[0, 0, :2] = torch.tensor([1.0, 0.5])  # nearest rows 0 then 1
    tokens[0, 1, 2:4] = torch.tensor([0.5, 1.0])  # nearest rows 3 then 2
    (neg,) = pf.negatives(tokens)
    assert torch.equal(neg, torch.eye(48)[[0, 1, 3, 2]])
    half = PatchFUNGI(tiny_timm(), seed=1, latent_dim=8, num_negatives=2, negative_fraction=0.5)
    half.set_memory(memory)
    (kept,) = half.negatives(tokens)
    rows = torch.tensor([0, 1, 3, 2])
    assert torch.equal(kept, torch.eye(48)[rows[half.kept[rows]]])


def test_negatives_search_one_index_with_the_chosen_backend(monkeypatch):
    """The support memory is indexed once (with the configured backend), not once per batch."""
    from funai_common import search

    built = []
    original = search.NeighborIndex.__init__

    def counting_init(self, bank, backend="auto", *args, **kwargs):
        built.append(backend)
        original(self, bank, backend, *args, **kwargs)

    monkeypatch.setattr(search.NeighborIndex, "__init__", counting_init)
    pf = PatchFUNGI(tiny_timm(), seed=1, latent_dim=8, num_negatives=2, negative_fraction=1.0, backend="torch")
    pf.set_memory(torch.eye(48)[:6] * 3)
    tokens = torch.zeros(1, 2, 48)
    tokens[0, 0, :2] = torch.tensor([1.0, 0.5])
    tokens[0, 1, 2:4] = torch.tensor([0.5, 1.0])
    for _ in range(3):
        (neg,) = pf.negatives(tokens)
        assert torch.equal(neg, torch.eye(48)[[0, 1, 3, 2]])
    assert built == ["torch"]


@pytest.mark.parametrize("bias", [True, False])
def test_patch_features_sum_to_per_image_gradient(bias):
    torch.manual_seed(0)
    model = tiny_timm()
    if not bias:
        model.blocks[1].attn.proj.bias = None
    pf = PatchFUNGI(model, seed=0, latent_dim=16)
    assert pf.projection.shape == (48, 48 * (48 + bias))
    images = torch.randn(2, 3, 32, 32)
    pf.setup([torch.randn(3, 3, 32, 32)])
    tokens, grads = pf.token_gradients(images, keep_prefix=True)
    assert tokens.shape == (2, 17, 48) and grads.shape == (2, 17, 48)
    # the per-token gradients (CLS included) add up to the image's gradient (plain autograd, one image at a time)
    full = per_sample_gradients_loop(pf.tokens, pf.layer, images[:, None], lambda t: pf.loss(t[:, 0]))
    expected = full.reshape(2, -1) @ pf.projection.float().T / math.sqrt(48)
    assert torch.allclose(grads.sum(1), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    patch_tokens, patch_grads = pf.token_gradients(images)
    assert torch.equal(patch_grads, grads[:, 1:]) and torch.equal(patch_tokens, tokens[:, 1:])
    feats = pf(images)
    assert feats.shape == (2, 16, 96) and torch.allclose(feats.norm(dim=-1), torch.ones(2, 16), atol=1e-5)


def test_hummingbird_with_patch_features():
    from funai_common.datasets import SyntheticSegmentation
    from funai_common.hummingbird import HummingbirdEvaluator

    torch.manual_seed(0)
    pf = PatchFUNGI(tiny_timm(), seed=0, latent_dim=16)
    pf.setup([torch.randn(2, 3, 32, 32)])
    train = SyntheticSegmentation(num_images=6, image_size=64, num_classes=3, seed=0)
    val = SyntheticSegmentation(num_images=4, image_size=64, num_classes=3, seed=1)
    evaluator = HummingbirdEvaluator(
        pf,
        train,
        val,
        num_classes=3,
        patch_size=8,
        input_size=32,
        augmentation_epochs=1,
        num_neighbors=5,
        batch_size=4,
        progress=False,
    )
    # colour-coded synthetic classes: nearest-neighbour label transfer on these features is far above chance (1/3)
    assert evaluator.evaluate()["miou"] > 0.5


def test_set_memory_normalises_and_draws_the_kept_rows_once():
    pf = PatchFUNGI(tiny_timm(), seed=3, latent_dim=8, negative_fraction=0.5)
    feats = torch.randn(1000, 48) * 5
    pf.set_memory(feats)
    assert torch.allclose(pf.memory, torch.nn.functional.normalize(feats, dim=-1))
    assert pf.kept.dtype == torch.bool and 400 < int(pf.kept.sum()) < 600
    first = pf.kept.clone()
    pf.set_memory(feats)
    assert torch.equal(first, pf.kept)


def test_support_memory_errors_name_the_problem():
    pf = PatchFUNGI(tiny_timm(), seed=0, latent_dim=8)
    with pytest.raises(ValueError, match=r"\(M, 48\)"):
        pf.set_memory(torch.randn(4, 32))
    with pytest.raises(ValueError, match="fewer than 2"):
        pf.set_memory(torch.randn(1, 48))
    with pytest.raises(RuntimeError, match="set_memory"):
        pf.loss(torch.randn(1, 3, 48))
    with pytest.raises(ValueError, match="negative_fraction"):
        PatchFUNGI(tiny_timm(), negative_fraction=0.0)
