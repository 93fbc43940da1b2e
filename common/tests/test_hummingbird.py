import numpy as np
import pytest
import torch

from funai_common.datasets import SyntheticSegmentation
from funai_common.handcrafted import colour_patch_features
from funai_common.hummingbird import (
    HummingbirdEvaluator,
    build_memory,
    patch_labels,
    rare_class_scores,
    select_memory_patches,
    transfer_labels,
    upsample_predictions,
)


def slow_patch_labels(masks, p, c):
    n, h, _ = masks.shape
    s = h // p
    out = torch.zeros(n, s * s, c)
    for i in range(n):
        for r in range(s):
            for col in range(s):
                block = masks[i, r * p : (r + 1) * p, col * p : (col + 1) * p].clone()
                block[block == 255] = 0
                for cls in range(c):
                    out[i, r * s + col, cls] = (block == cls).float().mean()
    return out


def test_patch_labels_match_slow_loop():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (3, 12, 12), generator=g)
    masks[0, :3, :5] = 255
    torch.testing.assert_close(patch_labels(masks, 4, 4), slow_patch_labels(masks, 4, 4))


def test_patch_labels_hand_case_and_ignore_option():
    mask = torch.tensor([[[1, 1, 2, 2], [1, 255, 2, 2], [0, 0, 0, 0], [0, 0, 0, 3]]])
    labels = patch_labels(mask, 2, 4)
    torch.testing.assert_close(labels[0, 0], torch.tensor([0.25, 0.75, 0, 0]))  # the 255 counts as class 0
    torch.testing.assert_close(labels[0, 1], torch.tensor([0.0, 0, 1, 0]))
    torch.testing.assert_close(labels[0, 3], torch.tensor([0.75, 0, 0, 0.25]))
    excluded = patch_labels(mask, 2, 4, ignore_as_background=False)
    torch.testing.assert_close(excluded[0, 0], torch.tensor([0.0, 1, 0, 0]))
    with pytest.raises(ValueError, match="mask values"):
        patch_labels(torch.full((1, 4, 4), 7), 2, 4)


def test_rare_class_scores_hand_case():
    # 2x2 patches: class 1 in one patch, class 0 in all four patches.
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, 0, 0] = 1
    scores = rare_class_scores(mask, 2, 2)
    # patch 0 holds classes 0 (in 4 patches) and 1 (in 1 patch) -> 5; the others hold class 0 only -> 4.
    torch.testing.assert_close(scores, torch.tensor([[5.0, 4.0, 4.0, 4.0]]))


def test_select_memory_patches_is_k_smallest_of_score_times_draw():
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 3, (4, 16, 16), generator=g)
    draws = torch.rand(4, 16, generator=g)
    chosen = select_memory_patches(masks, 4, 3, k=5, draws=draws)
    scores = rare_class_scores(masks, 4, 3)
    for i in range(4):
        products = [(float(scores[i, p] * draws[i, p]), p) for p in range(16)]
        assert set(chosen[i].tolist()) == {p for _, p in sorted(products)[:5]}


def test_patch_without_labelled_pixels_keeps_score_1e6_whatever_its_draw():
    # Reference (open-hummingbird-eval sample_features): patches with no class are set to 1e6 and only the
    # non-empty patches are multiplied by a uniform draw, so an empty patch is never chosen before a labelled one.
    mask = torch.full((1, 4, 4), 255, dtype=torch.long)
    mask[0, :2, 2:] = 1  # patch 1: class 1; patch 2: class 0; patch 3: class 2; patch 0: all ignored
    mask[0, 2:, :2] = 0
    mask[0, 2:, 2:] = 2
    draws = torch.tensor([[1e-9, 0.9, 0.8, 0.7]])
    # scores without the remap: patch 0 empty (1e6), the others one class each in one patch -> 1
    chosen = select_memory_patches(mask, 2, 3, k=3, draws=draws, ignore_as_background=False)
    assert set(chosen[0].tolist()) == {1, 2, 3}
    assert rare_class_scores(mask, 2, 3, ignore_as_background=False)[0, 0] == 1e6


def test_select_memory_patches_multiplies_score_by_draw_hand_case():
    # scores [5, 4, 4, 4] (see the rare-class hand case), draws [0.1, 0.2, 0.9, 0.9]: products [0.5, 0.8, 3.6, 3.6],
    # so the rare patch 0 comes first though its score alone is the largest.
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, 0, 0] = 1
    chosen = select_memory_patches(mask, 2, 2, k=2, draws=torch.tensor([[0.1, 0.2, 0.9, 0.9]]))
    assert chosen[0].tolist() == [0, 1]


def test_build_memory_unbounded_and_bounded():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 4, 3, generator=g)
    masks = torch.randint(0, 2, (2, 4, 4), generator=g)
    mf, ml = build_memory(feats, masks, 2, 2)
    expected = feats.reshape(-1, 3) / feats.reshape(-1, 3).norm(dim=1, keepdim=True)
    torch.testing.assert_close(mf, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ml, slow_patch_labels(masks, 2, 2).reshape(-1, 2))
    draws = torch.rand(2, 4, generator=g)
    mf, ml = build_memory(feats, masks, 2, 2, memory_size=4, draws=draws)
    chosen = select_memory_patches(masks, 2, 2, 2, draws)
    assert mf.shape == (4, 3) and ml.shape == (4, 2)
    torch.testing.assert_close(mf[:2], expected[chosen[0]], atol=1e-6, rtol=0)
    torch.testing.assert_close(mf[2:], expected[4 + chosen[1]], atol=1e-6, rtol=0)


def test_transfer_labels_matches_slow_loop():
    g = torch.Generator().manual_seed(3)
    memory = torch.nn.functional.normalize(torch.randn(50, 6, generator=g), dim=1)
    labels = torch.softmax(torch.randn(50, 3, generator=g), dim=1)
    queries = torch.randn(2, 4, 6, generator=g) * 3
    got = transfer_labels(memory, labels, queries, k=5, temperature=0.02, backend="torch")
    for m in range(2):
        for p in range(4):
            q = queries[m, p]
            idx = torch.argsort(memory @ q, descending=True)[:5]
            cos = torch.stack([torch.dot(q / q.norm(), memory[j] / memory[j].norm()) for j in idx])
            w = torch.exp(cos / 0.02) / torch.exp(cos / 0.02).sum()
            torch.testing.assert_close(got[m, p], (w[:, None] * labels[idx]).sum(0), atol=1e-5, rtol=1e-5)


def test_transfer_labels_defaults_are_k30_and_temperature_002():
    """The protocol's k = 30 neighbours and softmax temperature 0.02, checked against the slow loop, in the evaluator
    too. The memory rows lie close together (cosines within a few T) so that the 30 neighbours all weigh in."""
    import inspect

    g = torch.Generator().manual_seed(4)
    memory = torch.nn.functional.normalize(torch.tensor([1.0, 0, 0, 0]) + 0.1 * torch.randn(60, 4, generator=g), dim=1)
    labels = torch.softmax(torch.randn(60, 3, generator=g), dim=1)
    queries = torch.randn(1, 3, 4, generator=g)
    got = transfer_labels(memory, labels, queries, backend="torch")
    for p in range(3):
        q = torch.nn.functional.normalize(queries[0, p], dim=0)
        cos, idx = torch.topk(memory @ q, 30)
        w = torch.softmax(cos / 0.02, dim=0)
        torch.testing.assert_close(got[0, p], (w[:, None] * labels[idx]).sum(0), atol=1e-5, rtol=1e-5)
    params = inspect.signature(HummingbirdEvaluator).parameters
    assert (params["num_neighbors"].default, params["temperature"].default) == (30, 0.02)


def test_transfer_labels_weights_are_cosines_for_a_memory_of_any_norm():
    # The reference re-normalises the retrieved keys (cross_attention: F.normalize(k)), so a bank whose rows are not
    # unit-norm is ranked by raw inner product but weighted by softmax(cos / T). Hand case, D = 2, k = 2:
    # rows (2, 0) and (0, 0.5) (norms 2 and 0.5), query (1, 1): inner products 2 and 0.5, cosines both 1 / sqrt(2),
    # so the weights are equal and the result is the plain mean of the two labels.
    memory = torch.tensor([[2.0, 0.0], [0.0, 0.5], [-1.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    got = transfer_labels(memory, labels, torch.tensor([[[1.0, 1.0]]]), k=2, temperature=0.02, backend="torch")
    torch.testing.assert_close(got[0, 0], torch.tensor([0.5, 0.5]))


def test_upsample_row_major_quadrants():
    # S=2 one-hot patches upsampled x2: each quadrant takes its patch's class (patch 1 = row 0, col 1).
    probs = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 3]]), 4).float()
    out = upsample_predictions(probs, 4)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert torch.equal(out[0], expected)


def test_upsample_is_bilinear_with_half_pixel_centres():
    """Slow reference: output pixel x samples the patch grid at (x + 0.5) * S / size - 0.5 (clamped at 0), bilinear
    between the two nearest patch centres (align_corners=False), then argmax over classes."""
    g = torch.Generator().manual_seed(5)
    s, size, c = 3, 12, 4
    probs = torch.softmax(3 * torch.randn(2, s * s, c, generator=g), dim=-1)

    def taps(x):
        src = max((x + 0.5) * s / size - 0.5, 0.0)
        i0 = int(src)
        return i0, min(i0 + 1, s - 1), src - i0

    grid = probs.reshape(2, s, s, c)
    expected = torch.zeros(2, size, size, dtype=torch.long)
    for y in range(size):
        r0, r1, ly = taps(y)
        for x in range(size):
            c0, c1, lx = taps(x)
            value = (1 - ly) * ((1 - lx) * grid[:, r0, c0] + lx * grid[:, r0, c1]) + ly * (
                (1 - lx) * grid[:, r1, c0] + lx * grid[:, r1, c1]
            )
            expected[:, y, x] = value.argmax(-1)
    assert torch.equal(upsample_predictions(probs, size), expected)


def _evaluator(feature_fn, **kw):
    train = SyntheticSegmentation(num_images=8, image_size=64, num_classes=4, seed=0, cell=16)
    val = SyntheticSegmentation(num_images=4, image_size=64, num_classes=4, seed=1, cell=16)
    return HummingbirdEvaluator(
        feature_fn,
        train,
        val,
        num_classes=4,
        patch_size=8,
        input_size=64,
        progress=False,
        **{"augmentation_epochs": 1, "batch_size": 4, **kw},
    )


def test_colour_features_reach_near_perfect_miou_and_noise_does_not():
    perfect = _evaluator(lambda x: colour_patch_features(x, 8)).evaluate()
    assert perfect["miou"] > 0.9
    noise = _evaluator(lambda x: torch.randn(x.shape[0], 64, 16)).evaluate()
    assert noise["miou"] < 0.6
    assert noise["miou"] < perfect["miou"] - 0.3


def test_evaluate_scores_the_predictions_with_hungarian_matching():
    """evaluate() is the mIoU (Hungarian) of predict() on the validation transform's masks; weak features make the
    matching matter (identity scores differently)."""
    from funai_common.metrics import miou

    w = torch.randn(192, 1, generator=torch.Generator().manual_seed(0))

    def fn(x):  # a 1-D random projection of each 8 x 8 patch: poor features
        return x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], 64, -1) @ w

    ev = _evaluator(fn)
    pairs = [ev.val_transform(*ev.val_dataset[i]) for i in range(4)]
    images, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    pred = ev.predict(images)
    result = ev.evaluate()
    assert result["miou"] == pytest.approx(miou(masks, pred, 4, ignore_index=ev.ignore_index)[0], abs=1e-12)
    assert result["miou"] != pytest.approx(miou(masks, pred, 4, ignore_index=ev.ignore_index, matching="identity")[0])


def test_bounded_memory_is_seeded():
    fn = lambda x: colour_patch_features(x, 8)  # noqa: E731
    a = _evaluator(fn, memory_size=100, seed=5).evaluate()
    b = _evaluator(fn, memory_size=100, seed=5).evaluate()
    assert a == b and a["memory_rows"] == 96  # 100 // 8 images = 12 patches per image
    assert a["miou"] > 0.8


def test_memory_larger_than_all_patches_keeps_every_patch():
    g = torch.Generator().manual_seed(3)
    feats, masks = torch.randn(2, 4, 3, generator=g), torch.randint(0, 2, (2, 4, 4), generator=g)
    mf, _ = build_memory(feats, masks, 2, 2, memory_size=1000)
    full, _ = build_memory(feats, masks, 2, 2)
    assert mf.shape == full.shape
    assert torch.equal(mf.sort(dim=0).values, full.sort(dim=0).values)  # same rows, rare-class order
    fn = lambda x: colour_patch_features(x, 8)  # noqa: E731
    assert _evaluator(fn, memory_size=10**6).evaluate()["memory_rows"] == 8 * 64  # all patches of 8 images


def test_memory_smaller_than_the_neighbour_count_is_a_clear_error():
    fn = lambda x: colour_patch_features(x, 8)  # noqa: E731
    with pytest.raises(ValueError, match="holds 8 patches, fewer than num_neighbors=30"):
        _evaluator(fn, memory_size=8).evaluate()  # 1 patch per image


def test_memory_size_below_one_is_an_error():
    fn = lambda x: colour_patch_features(x, 8)  # noqa: E731
    for bad in (0, -5):  # had silently kept one patch per image
        with pytest.raises(ValueError, match=rf"^memory_size {bad}: expected a positive number of rows"):
            _evaluator(fn, memory_size=bad)


def test_memory_features_are_kept_only_on_request():
    fn = lambda x: colour_patch_features(x, 8)  # noqa: E731
    kept = _evaluator(fn, memory_size=100, keep_memory_features=True)
    index, labels = kept.build_memory()
    assert kept.memory_features.shape == (96, index.dim) and len(labels) == 96
    # the kept rows are the indexed ones: every inner product with random queries comes back from the index
    queries = torch.randn(3, index.dim)
    scores, _ = index.search(queries, 96)
    expected = (queries @ kept.memory_features.T).sort(dim=1, descending=True).values
    assert torch.allclose(scores, expected, atol=1e-4)
    plain = _evaluator(fn, memory_size=100)
    plain.build_memory()
    assert plain.memory_features is None


@pytest.mark.parametrize("memory_size", [100, None])
def test_memory_does_not_depend_on_the_batch_split(memory_size):
    """The rows of every batch land in order in one buffer: batches of 3 (a partial last one) and 2 augmentation
    epochs give the same memory as one batch of all 8 images (the draws come from one generator in the same order)."""
    fn = lambda x: colour_patch_features(x, 8)  # noqa: E731
    whole, split = (
        _evaluator(fn, memory_size=memory_size, keep_memory_features=True, augmentation_epochs=2, batch_size=b)
        for b in (8, 3)
    )
    (_, labels_whole), (_, labels_split) = whole.build_memory(), split.build_memory()
    rows = 96 if memory_size else 2 * 8 * 64  # 100 // (8 images x 2 epochs) = 6 per image; else every patch
    assert len(whole.memory_features) == rows and torch.equal(whole.memory_features, split.memory_features)
    assert torch.equal(labels_whole, labels_split)


def test_float16_bank_equals_a_float32_search_of_the_rounded_memory():
    w = torch.randn(192, 16, generator=torch.Generator().manual_seed(0))

    def fn(x):  # a random projection of each 8 x 8 patch: features that float16 rounding changes
        patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], 64, -1)
        return patches @ w

    half = _evaluator(fn, backend="torch", bank_dtype=torch.float16, keep_memory_features=True)
    index, labels = half.build_memory()
    assert index.bank.dtype == torch.float16
    assert not torch.equal(index.bank.float(), half.memory_features)
    images = torch.stack([half.val_transform(*half.val_dataset[i])[0] for i in range(4)])
    rounded = half.memory_features.half().float()
    expected = upsample_predictions(transfer_labels(rounded, labels, fn(images), backend="torch"), 64)
    assert torch.equal(half.predict(images), expected)
    assert _evaluator(fn, backend="torch").build_memory()[0].bank.dtype == torch.float32  # default unchanged


def test_feature_fn_shape_is_checked():
    with pytest.raises(ValueError, match="feature_fn must return"):
        _evaluator(lambda x: torch.randn(x.shape[0], 10, 4)).evaluate()


def test_synthetic_dataset_is_deterministic_and_grid_aligned():
    ds = SyntheticSegmentation(num_images=3, image_size=64, num_classes=5, seed=7, cell=16)
    a, b = np.array(ds[1][1]), np.array(SyntheticSegmentation(3, 64, 5, seed=7, cell=16)[1][1])
    assert np.array_equal(a, b)
    cells = a.reshape(4, 16, 4, 16)
    assert (cells == cells[:, :1, :, :1]).all()  # each 16x16 cell holds one class
