import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from counting.density import density_from_boxes, gaussian_kernel1d, kernel_size_and_sigma


def hand_gaussian(size: int, sigma: float) -> np.ndarray:
    half = (size - 1) // 2
    values = np.array([math.exp(-0.5 * (i / sigma) ** 2) for i in range(-half, half + 1)])
    return values / values.sum()


@pytest.mark.parametrize(
    "extent, size, sigma", [(20.0, 21, 2.5), (21.7, 21, 2.5), (24.99, 25, 3.0), (9.0, 9, 1.0), (30.0, 31, 3.75)]
)
def test_kernel_rule(extent, size, sigma):
    assert kernel_size_and_sigma(extent) == (size, pytest.approx(sigma))


def test_kernel_matches_hand_gaussian():
    assert np.allclose(gaussian_kernel1d(21, 2.5).numpy(), hand_gaussian(21, 2.5), atol=1e-7)


def test_single_box_centre_mass_and_separable_profile():
    # box 20 wide, 12 tall, centre (50.7, 40.2) -> pixel (row 40, col 50); x kernel 21 / sigma 2.5, y 13 / 1.5
    boxes = torch.tensor([[40.7, 34.2, 60.7, 46.2]])
    d = density_from_boxes(boxes, 100, 120)
    assert d.shape == (100, 120)
    assert tuple(np.unravel_index(int(d.argmax()), d.shape)) == (40, 50)
    assert float(d.sum()) == pytest.approx(3000.0, rel=1e-5)
    expected = np.zeros((100, 120))
    expected[34:47, 40:61] = 3000.0 * np.outer(hand_gaussian(13, 1.5), hand_gaussian(21, 2.5))
    assert np.allclose(d.numpy(), expected, atol=1e-3)


def test_two_centres_on_one_pixel_count_once():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [10.4, 10.4, 30.4, 30.4]])  # both centres -> pixel (20, 20)
    assert float(density_from_boxes(boxes, 64, 64).sum()) == pytest.approx(3000.0, rel=1e-5)
    apart = torch.tensor([[10.0, 10.0, 30.0, 30.0], [30.0, 30.0, 50.0, 50.0]])
    assert float(density_from_boxes(apart, 64, 64, scale=60.0).sum()) == pytest.approx(120.0, rel=1e-5)


def test_mean_box_size_sets_the_kernel():
    # widths 10 and 30 -> mean 20 -> 21 taps; heights 8 and 8 -> 9 taps
    boxes = torch.tensor([[0.0, 0.0, 10.0, 8.0], [50.0, 50.0, 80.0, 58.0]])
    d = density_from_boxes(boxes, 100, 100)
    row = d[54].numpy()  # second centre at row 54, col 65
    assert np.allclose(row[55:76] / row[55:76].sum(), hand_gaussian(21, 2.5), atol=1e-6)
    assert (row[:55] == 0).all() and (row[76:] == 0).all()


def test_reflect_padding_at_the_border_matches_scipy_mirror():
    boxes = torch.tensor([[-9.0, 20.0, 11.0, 40.0]])  # centre column 1: the kernel reaches past the left edge
    d = density_from_boxes(boxes, 50, 50)
    points = np.zeros((50, 50))
    points[30, 1] = 3000.0
    k = hand_gaussian(21, 2.5)
    expected = ndimage.correlate1d(ndimage.correlate1d(points, k, axis=1, mode="mirror"), k, axis=0, mode="mirror")
    assert np.allclose(d.numpy(), expected, atol=1e-3)
    assert float(d.sum()) != pytest.approx(3000.0, rel=1e-3)  # mass is not preserved at borders


def test_empty_boxes_give_zeros():
    d = density_from_boxes(torch.zeros(0, 4), 8, 9)
    assert d.shape == (8, 9) and float(d.abs().sum()) == 0.0
