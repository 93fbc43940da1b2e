import pytest
import torch
import torch.nn.functional as F

from counting.losses import density_mse_loss


def test_plain_mse_without_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 8, 9, generator=g), torch.rand(3, 8, 9, generator=g)
    loss = density_mse_loss(pred, target, keep_prob=1.0, standard_size=None)
    assert float(loss) == pytest.approx(float(F.mse_loss(pred, target)), rel=1e-6)


def test_given_mask_is_ored_with_target_pixels():
    pred = torch.full((2, 4, 4), 2.0)
    target = torch.zeros(2, 4, 4)
    target[0, 1, 1] = 1.0  # always kept: (2-1)^2 = 1
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    keep[1, 0, :] = True  # 4 pixels of image 1: 4 * 2^2 = 16
    loss = density_mse_loss(pred, target, keep_mask=keep, standard_size=2)
    assert float(loss) == pytest.approx(((1.0 / 4) + (16.0 / 4)) / 2)


def test_standard_size_loop():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 6, 6, generator=g), torch.randn(4, 6, 6, generator=g).clamp_min(0)
    keep = torch.rand(4, 6, 6, generator=g) < 0.5
    per_image = []
    for b in range(4):
        total = 0.0
        for i in range(6):
            for j in range(6):
                if keep[b, i, j] or target[b, i, j] > 0:
                    total += float(pred[b, i, j] - target[b, i, j]) ** 2
        per_image.append(total / 224**2)
    loss = density_mse_loss(pred, target, keep_mask=keep)
    assert float(loss) == pytest.approx(sum(per_image) / 4, rel=1e-5)


def test_no_standard_size_divides_by_the_pixel_count():
    pred, target = torch.full((2, 4, 5), 3.0), torch.zeros(2, 4, 5)
    keep = torch.zeros(2, 4, 5, dtype=torch.bool)
    keep[0, :2] = True  # 10 kept pixels of 40, error 9 each
    assert float(density_mse_loss(pred, target, keep_mask=keep, standard_size=None)) == pytest.approx(90 / 40)


def test_bernoulli_keep_fraction():
    pred, target = torch.ones(2, 200, 200), torch.zeros(2, 200, 200)
    loss = density_mse_loss(pred, target, keep_prob=0.8, standard_size=1, generator=torch.Generator().manual_seed(0))
    assert float(loss) / (200 * 200) == pytest.approx(0.8, abs=0.01)


def test_bad_shapes():
    with pytest.raises(ValueError, match="pred and target"):
        density_mse_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="keep_mask"):
        density_mse_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), keep_mask=torch.ones(3, 3, dtype=torch.bool))


def test_shared_mask_is_one_draw_for_the_batch():
    # image 1 has twice image 0's error everywhere: with one shared mask its masked sum is exactly 4x image 0's,
    # which is the whole loss of image 0 alone drawn from the same generator state
    pred = torch.stack([torch.ones(30, 30), torch.full((30, 30), 2.0)])
    target = torch.zeros(2, 30, 30)
    shared = density_mse_loss(
        pred, target, standard_size=1, generator=torch.Generator().manual_seed(3), shared_mask=True
    )
    single = density_mse_loss(pred[:1], target[:1], standard_size=1, generator=torch.Generator().manual_seed(3))
    independent = density_mse_loss(pred, target, standard_size=1, generator=torch.Generator().manual_seed(3))
    assert float(shared) == pytest.approx(float(single) * (1 + 4) / 2)
    assert float(independent) != pytest.approx(float(shared))


def test_keep_all_objects_keeps_distractor_pixels():
    pred, target, target_all = torch.full((1, 3, 3), 2.0), torch.zeros(1, 3, 3), torch.zeros(1, 3, 3)
    target[0, 0, 0] = target_all[0, 0, 0] = 1.0  # target pixel: error 1
    target_all[0, 2, 2] = 5.0  # distractor pixel: error (2 - 0)^2 = 4
    nothing = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert float(density_mse_loss(pred, target, keep_mask=nothing, standard_size=1)) == pytest.approx(1.0)
    kept = density_mse_loss(
        pred, target, keep_mask=nothing, standard_size=1, target_all=target_all, keep_all_objects=True
    )
    assert float(kept) == pytest.approx(1.0 + 4.0)


def test_distractor_weight_on_pixels_above_the_threshold():
    # weighted where (all - target) / 3000 > 1e-3, i.e. a non-target density above 3
    pred, target, target_all = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)
    target[0, 0, 0], target_all[0, 0, 0] = 1.0, 1.0  # target only: weight 1, error 1
    target_all[0, 0, 1] = 2.0  # non-target density 2 < 3: weight 1, error 0 (target is 0 there)
    pred[0, 0, 1] = 1.0  # ... error 1
    target_all[0, 1, 0], pred[0, 1, 0] = 4.0, 3.0  # non-target density 4 > 3: weight 2, error 9
    everything = torch.ones(1, 2, 2, dtype=torch.bool)
    loss = density_mse_loss(
        pred, target, keep_mask=everything, standard_size=1, target_all=target_all, distractor_weight=2.0
    )
    assert float(loss) == pytest.approx(1.0 + 1.0 + 2 * 9.0)
    masked_out = everything.clone()
    masked_out[0, 1, 0] = False  # a dropped pixel stays dropped whatever its weight
    loss = density_mse_loss(
        pred, target, keep_mask=masked_out, standard_size=1, target_all=target_all, distractor_weight=2.0
    )
    assert float(loss) == pytest.approx(2.0)


def test_ablation_options_need_the_all_object_map():
    with pytest.raises(ValueError, match="target_all"):
        density_mse_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), keep_all_objects=True)
    with pytest.raises(ValueError, match="target_all"):
        density_mse_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), distractor_weight=2.0)
