import math

import numpy as np
import pytest
import torch

from fungi.views import (
    dino_views,
    noise_roll_views,
    patchify_geometry,
    patchify_views,
    resize,
    sample_generator,
    word_deletion,
)


def test_patchify_geometry_and_content():
    assert patchify_geometry(224) == (112, 18, 7)
    assert patchify_geometry(32) == (16, 2, 9)
    image = torch.randn(1, 3, 224, 224)
    views = patchify_views(image)
    assert views.shape == (1, 49, 3, 224, 224)
    for index, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (6, 6)]):
        k = row * 7 + col  # row-major, height outer
        crop = image[:, :, 18 * row : 18 * row + 112, 18 * col : 18 * col + 112]
        assert torch.allclose(views[0, k], resize(crop, (224, 224))[0], atol=1e-5), index


def test_dino_views_depend_only_on_image_and_seed():
    images = torch.randn(3, 3, 32, 32)
    views = dino_views(images, seed=0, num_local=4)
    assert views.shape == (3, 6, 3, 32, 32)
    assert torch.equal(views[1:2], dino_views(images[1:2], seed=0, num_local=4))
    assert not torch.equal(views, dino_views(images, seed=1, num_local=4))
    assert not torch.equal(views[0, 0], views[0, 1])


def test_text_and_audio_views():
    text = "i lost my card yesterday can you block it"
    views = word_deletion(text, 12, 0.1, seed=0)
    assert views == word_deletion(text, 12, 0.1, seed=0) and len(views) == 12
    assert all(set(v.split()) <= set(text.split()) for v in views)
    assert all(len(v.split()) == 1 for v in word_deletion("a b c", 3, 1.0, seed=0))  # never empty
    spec = torch.zeros(2, 20, 4)
    audio = noise_roll_views(spec, 5, seed=0, max_noise=0.1)
    assert audio.shape == (2, 5, 20, 4) and 0 <= audio.min() and audio.max() < 0.1


@pytest.mark.parametrize("n, deleted", [(1, 0), (2, 1), (5, 1), (10, 1), (25, 3), (40, 4), (200, 10)])
def test_word_deletion_count_like_nlpaug(n, deleted):
    # nlpaug RandomWordAug(action="delete", aug_p=0.1, aug_min=1, aug_max=10): ceil(0.1 n) words, 1..10, keep one
    words = [f"w{i}" for i in range(n)]
    views = word_deletion(" ".join(words), 20, 0.1, seed=3)
    for view in views:
        kept = view.split()
        assert len(kept) == n - deleted
        assert kept == [w for w in words if w in set(kept)]  # order kept, distinct words
    assert views == word_deletion(" ".join(words), 20, 0.1, seed=3)
    if deleted:
        assert views != word_deletion(" ".join(words), 20, 0.1, seed=4)


def test_word_deletion_is_uniform_over_words():
    words = [f"w{i}" for i in range(5)]
    views = word_deletion(" ".join(words), 2000, 0.1, seed=0)  # one word deleted per view
    counts = [sum(w not in v.split() for v in views) for w in words]
    assert all(abs(c - 400) < 4 * math.sqrt(2000 * 0.2 * 0.8) for c in counts)


def test_half_precision_samples_hash_as_float32():
    x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    seed = sample_generator(x, 1).initial_seed()
    assert seed == sample_generator(x.float(), 1).initial_seed() != sample_generator(x * 2, 1).initial_seed()
    views = noise_roll_views(x, 2, seed=0)  # (B=3, T=8, F=8) spectrograms in bf16
    assert views.dtype == torch.bfloat16 and torch.allclose(views.float(), noise_roll_views(x.float(), 2, 0), atol=0.02)


def test_linear_probe_rows_are_the_incremental_combinations_only():
    from fungi.evaluation import evaluate_blocks

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 20)
    blocks = {n: torch.from_numpy(rng.normal(size=(40, 4)) + y[:, None]).float() for n in ("embeddings", "kl", "dino")}
    rows = evaluate_blocks(blocks, y, blocks, y, protocols=("knn", "linear"), pca_dim=None)
    with_linear = [r["features"] for r in rows if "linear_top1" in r]
    assert len(rows) == 7 and with_linear == ["embeddings", "embeddings+kl", "embeddings+kl+dino"]
