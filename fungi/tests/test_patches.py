import math

import torch

from fungi.gradients import per_sample_gradients_loop
from fungi.patches import PatchFUNGI, project_token_gradients, token_infonce
from fungi.projection import random_projection
from fungi.tiny import tiny_timm


def test_token_projection_equals_projected_outer_products():
    g, a = torch.randn(5, 3), torch.randn(5, 4)
    p = random_projection(6, 3 * 5, seed=0)
    outer = torch.einsum("to,ti->toi", g, torch.cat([a, torch.ones(5, 1)], 1)).reshape(5, -1)
    assert torch.allclose(
        project_token_gradients(g, a, p.to(torch.int8), chunk=2), outer @ p.T / math.sqrt(6), atol=1e-5
    )


def test_token_infonce_library_is_paper_shifted_when_tau_is_one():
    z, n = torch.randn(2, 4, 8), torch.randn(2, 4, 2, 8)
    lib = token_infonce(z, n, temperature=1.0, variant="library")
    paper = token_infonce(z, n, temperature=1.0, variant="paper")
    assert torch.allclose(lib, paper - 10000.0, atol=1e-2)


def test_patch_features_sum_to_per_image_gradient():
    torch.manual_seed(0)
    pf = PatchFUNGI(tiny_timm(), seed=0, latent_dim=16)
    images = torch.randn(2, 3, 32, 32)
    pf.setup([torch.randn(3, 3, 32, 32)])
    tokens, grads = pf.token_gradients(images)
    assert tokens.shape == (2, 16, 48) and grads.shape == (2, 16, 48)
    # the per-token gradients add up to the image's gradient (computed by plain autograd, one image at a time)
    full = per_sample_gradients_loop(pf.tokens, pf.layer, images[:, None], lambda t: pf.loss(t[:, 0]))
    expected = full.reshape(2, -1) @ pf.projection.float().T / math.sqrt(48)
    assert torch.allclose(grads.sum(1), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
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


def test_set_memory_keeps_a_seeded_normalised_subsample():
    pf = PatchFUNGI(tiny_timm(), seed=3, latent_dim=8, subsample=0.5)
    feats = torch.randn(10, 48) * 5
    pf.set_memory(feats)
    assert pf.memory.shape == (5, 48)
    assert torch.allclose(pf.memory.norm(dim=-1), torch.ones(5), atol=1e-6)
    normed = torch.nn.functional.normalize(feats, dim=-1)
    # every kept row is one of the given rows, each at most once
    matches = (pf.memory @ normed.T > 1 - 1e-6).sum(1)
    assert matches.tolist() == [1] * 5 and len({int(i) for i in (pf.memory @ normed.T).argmax(1)}) == 5
    first = pf.memory.clone()
    pf.set_memory(feats)
    assert torch.equal(first, pf.memory)
    pf.set_memory(feats[:2])  # never fewer rows than negatives per token
    assert pf.memory.shape == (2, 48)


def test_set_memory_rejects_features_of_another_width():
    import pytest

    pf = PatchFUNGI(tiny_timm(), seed=0, latent_dim=8)
    with pytest.raises(ValueError, match=r"\(M, 48\)"):
        pf.set_memory(torch.randn(4, 32))
