import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from counting.density import density_from_boxes, dot_density_map, gaussian_kernel1d, kernel_size_and_sigma


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


def test_kernel_as_wide_as_the_reflected_map_is_not_cut():
    # a 30 px wide box on a 16 px wide map: 31 taps (radius 15) still fit one reflection of the 16 columns
    boxes = torch.tensor([[-7.0, 15.0, 23.0, 25.0]])  # centre (col 8, row 20), x kernel 31 / 3.75, y 11 / 1.25
    d = density_from_boxes(boxes, 40, 16)
    points = np.zeros((40, 16))
    points[20, 8] = 3000.0
    expected = ndimage.correlate1d(points, hand_gaussian(31, 3.75), axis=1, mode="mirror")
    expected = ndimage.correlate1d(expected, hand_gaussian(11, 1.25), axis=0, mode="mirror")
    assert d.shape == (40, 16) and np.allclose(d.numpy(), expected, atol=1e-3)


def test_empty_boxes_give_zeros():
    d = density_from_boxes(torch.zeros(0, 4), 8, 9)
    assert d.shape == (8, 9) and float(d.abs().sum()) == 0.0


def slow_reflect_blur(dots: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Direct 2-D convolution with the separable kernel over a half-sample symmetric extension ("d c b a | a b c d")."""
    r = len(kernel) // 2
    padded = np.pad(dots, r, mode="symmetric")
    out = np.zeros_like(dots, dtype=np.float64)
    for i in range(dots.shape[0]):
        for j in range(dots.shape[1]):
            window = padded[i : i + 2 * r + 1, j : j + 2 * r + 1]
            out[i, j] = (window * np.outer(kernel, kernel)).sum()
    return out


def test_dot_map_interior_dot_by_hand():
    # one dot at (x 10.6, y 7.2) of a 40 x 60 image shown at 20 x 30: pixel (row int(3.6), col int(5.3)) = (3, 5)
    density = dot_density_map(np.array([[10.6, 7.2]]), 20, 30, scale_xy=(0.5, 0.5))
    g = hand_gaussian(9, 1.0)  # sigma 1, scipy's default truncation at 4 sigma
    assert density.shape == (20, 30)
    assert float(density[3, 5]) == pytest.approx(3000 * g[4] ** 2, rel=1e-5)
    assert float(density[3, 7]) == pytest.approx(3000 * g[4] * g[6], rel=1e-5)
    assert float(density.sum()) == pytest.approx(3000, rel=1e-5)


def test_dot_map_duplicates_borders_and_slow_loop():
    points = np.array([[0.2, 0.4], [0.9, 0.1], [15.0, 9.0], [100.0, -3.0]])  # two on pixel (0, 0); one off the map
    density = dot_density_map(points, 12, 16).numpy()
    dots = np.zeros((12, 16))
    dots[0, 0] = dots[9, 15] = dots[0, 15] = 1.0  # the off-map point is clamped to the last column, row 0
    assert np.allclose(density, 3000 * slow_reflect_blur(dots, hand_gaussian(9, 1.0)), atol=1e-3)
    assert float(density.sum()) == pytest.approx(3 * 3000, rel=1e-5)  # reflect mode keeps the mass at borders
    assert float(dot_density_map(np.zeros((0, 2)), 5, 6).abs().sum()) == 0.0


def test_point_map_is_built_on_the_device_of_the_boxes():
    """CUDA boxes used to index a CPU map (an error on a GPU); the meta device stands in for CUDA here."""
    from counting.density import point_map

    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 3.0, 6.0, 7.0]])
    assert point_map(boxes.to("meta"), 8, 8).device.type == "meta"
    assert point_map(boxes.tolist(), 8, 8).device.type == "cpu"


def test_blur_kernel_is_on_the_device_of_the_map(monkeypatch):
    """The Gaussian kernel is made on the CPU; it must follow the map (conv2d of a CUDA map with a CPU kernel fails,
    which the meta device does not check by itself, hence the spy)."""
    import counting.density as density

    conv2d = density.F.conv2d

    def same_device_conv2d(x, weight, *args, **kwargs):
        assert weight.device == x.device, f"kernel on {weight.device}, map on {x.device}"
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(density.F, "conv2d", same_device_conv2d)
    assert density.gaussian_blur(torch.zeros(16, 16, device="meta"), (5, 7), (0.5, 0.75)).device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_density_from_cuda_boxes_matches_cpu():
    boxes = torch.tensor([[10.0, 12.0, 30.0, 28.0], [40.0, 5.0, 52.0, 21.0]])
    cpu = density_from_boxes(boxes, 64, 64)
    gpu = density_from_boxes(boxes.cuda(), 64, 64)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
