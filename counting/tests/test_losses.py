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
