import pytest
import torch

from counting.inference import (
    count_image,
    exemplar_normalised_count,
    needs_tiling,
    sliding_window,
    tiles_3x3,
    window_starts,
)


@pytest.mark.parametrize(
    "width, starts",
    [(384, [0]), (500, [0, 116]), (640, [0, 128, 256]), (600, [0, 128, 216]), (768, [0, 128, 256, 384])],
)
def test_window_starts(width, starts):
    assert window_starts(width, 384, 128) == starts


@pytest.mark.parametrize("width", [24, 40, 44, 56])  # 40 and 56 fit the 8-px stride exactly, 44 does not
def test_pointwise_model_is_reproduced_exactly(width):
    image = torch.randn(1, 3, 24, width)
    out = sliding_window(lambda x: 2 * x[:, 0] ** 2, image, window=24, stride=8)
    assert torch.allclose(out, 2 * image[0, 0] ** 2, atol=1e-6)


def test_coverage_average_against_slow_loop():
    # a model whose output is the window index: the result is the per-pixel mean of the indices covering it
    width, window, stride = 44, 24, 8
    calls = []

    def fn(x):
        calls.append(len(calls))
        return torch.full((1, window, window), float(calls[-1]))

    out = sliding_window(fn, torch.zeros(1, 3, window, width), window, stride)
    starts = [0, 8, 16, 20]
    for col in range(width):
        covering = [k for k, s in enumerate(starts) if s <= col < s + window]
        assert out[0, col] == pytest.approx(sum(covering) / len(covering))
    assert len(calls) == 4


def test_narrow_image_is_padded():
    image = torch.randn(1, 3, 24, 16)
    out = sliding_window(lambda x: x[:, 1], image, window=24, stride=8)
    assert out.shape == (24, 16) and torch.allclose(out, image[0, 1])
    seen = []
    sliding_window(lambda x: seen.append(x) or x[:, 0], image, window=24, stride=8)
    assert len(seen) == 1 and seen[0].shape == (1, 3, 24, 24)
    assert torch.equal(seen[0][..., :16], image) and (seen[0][..., 16:] == 0).all()  # zeros on the right


def test_wrong_height_is_an_error():
    with pytest.raises(ValueError, match="height"):
        sliding_window(lambda x: x[:, 0], torch.zeros(1, 3, 20, 30), window=24)
    with pytest.raises(ValueError, match="stride must be a positive number of pixels, got 0"):
        sliding_window(lambda x: x[:, 0], torch.zeros(1, 3, 24, 30), window=24, stride=0)


def test_tiles_cover_grid_with_remainder():
    image = torch.arange(10 * 13, dtype=torch.float32).reshape(1, 1, 10, 13).expand(1, 3, 10, 13).contiguous()
    tiles = tiles_3x3(image)
    assert len(tiles) == 9 and all(t.shape == (1, 3, 10, 13) for t in tiles)
    # tile rows [0,3), [3,6), [6,10); cols [0,4), [4,8), [8,13): the upscaled corners keep the corner pixels
    assert tiles[0][0, 0, 0, 0] == image[0, 0, 0, 0]
    assert tiles[8][0, 0, -1, -1] == image[0, 0, -1, -1]
    assert tiles[4][0, 0, 0, 0] == image[0, 0, 3, 4]
    # 11 x 14: bounds 2 * (side // 3), not 2 * side // 3: rows [0,3), [3,6), [6,11); cols [0,4), [4,8), [8,14)
    image = torch.arange(11 * 14, dtype=torch.float32).reshape(1, 1, 11, 14).expand(1, 3, 11, 14).contiguous()
    tiles = tiles_3x3(image)
    assert tiles[8][0, 0, 0, 0] == image[0, 0, 6, 8]
    assert float(tiles[4][0, 0, -1, -1]) == pytest.approx(float(image[0, 0, 5, 7]))


def test_exemplar_normalisation_by_hand():
    density = torch.zeros(10, 10)
    density[2:4, 2:4] = 3000.0  # 4 objects' mass inside rect 1
    density[7, 7] = 6000.0  # 2 objects inside rect 2
    rects = torch.tensor([[2, 2, 3, 3], [7, 7, 7, 7]])  # inclusive
    # total 6, exemplar masses 4 and 2 -> mean 3 > 1.8 -> 6 / 3
    assert exemplar_normalised_count(density, rects) == pytest.approx(2.0)
    assert exemplar_normalised_count(density, rects, threshold=3.5) == pytest.approx(6.0)
    assert exemplar_normalised_count(density, rects[1:], threshold=1.8) == pytest.approx(3.0)  # mean 2
    assert exemplar_normalised_count(density, rects[:0]) == pytest.approx(6.0)
    # a mean exemplar mass of exactly the threshold does not normalise (strictly greater)
    assert exemplar_normalised_count(density, rects[1:], threshold=2.0) == pytest.approx(6.0)


def test_exemplar_normalisation_scaled_rects():
    density = torch.zeros(30, 30)
    density[3:6, 6:9] = 1000.0  # rect [1, 2, 1, 2] at scale 3 covers rows 3..3, cols 6..6 only
    assert exemplar_normalised_count(density, torch.tensor([[1, 2, 1, 2]]), scale=3) == pytest.approx(3.0)
    density[3, 6] = 3000.0 * 4  # now the exemplar holds 4 objects: 14 / 4
    assert exemplar_normalised_count(density, torch.tensor([[1, 2, 1, 2]]), scale=3) == pytest.approx(
        (8000 + 12000) / 3000 / 4
    )


def test_needs_tiling_requires_both_sides_small():
    assert needs_tiling(torch.tensor([[0, 0, 9, 9]]))
    assert not needs_tiling(torch.tensor([[0, 0, 9, 10]]))
    assert needs_tiling(torch.tensor([[0, 0, 30, 30], [5, 5, 10, 14]]))


def test_count_image_tiles_small_exemplars():
    ones = lambda x: torch.ones(1, x.shape[-2], x.shape[-1])  # noqa: E731
    image = torch.zeros(1, 3, 24, 40)
    count, density = count_image(ones, image, torch.tensor([[0, 0, 20, 20]]), window=24, stride=8, density_scaling=1)
    assert density.shape == (24, 40) and count == pytest.approx(24 * 40 / (21 * 21))  # normalised by the rect mass
    count, density = count_image(ones, image, torch.tensor([[0, 0, 2, 2]]), window=24, stride=8, density_scaling=100)
    # rect 7x7 at scale 3 holds 0.49 objects (< 1.8): no normalisation
    assert density.shape == (72, 120) and count == pytest.approx(9 * 24 * 40 / 100)


def test_tiling_above_50_protocol():
    ones = lambda x: torch.ones(1, x.shape[-2], x.shape[-1])  # noqa: E731
    image = torch.zeros(1, 3, 24, 40)
    # small exemplar (2x2 px): tiled first as in "original" (the reference's s_cnt rule): 72*120 / 1000, mass 49/1000
    small = torch.tensor([[0, 0, 2, 2]])
    count, density = count_image(ones, image, small, "tiling_above_50", window=24, stride=8, density_scaling=1000)
    assert density.shape == (72, 120) and count == pytest.approx(8.64)
    # 11x1 px exemplar is not small: untiled 960/1000 = 0.96 <= 50, kept
    rect = torch.tensor([[0, 0, 10, 0]])
    count, density = count_image(ones, image, rect, "tiling_above_50", window=24, stride=8, density_scaling=1000)
    assert density.shape == (24, 40) and count == pytest.approx(0.96)
    # untiled 960/15 = 64 > 50 (mass 11/15 < 1.8): re-counted tiled, 8640/15 normalised by mass 31/15 (rows 0..30)
    count, density = count_image(ones, image, rect, "tiling_above_50", window=24, stride=8, density_scaling=15)
    assert density.shape == (72, 120) and count == pytest.approx(8640 / 31)
    count, density = count_image(ones, image, rect, "original", window=24, stride=8, density_scaling=15)
    assert density.shape == (24, 40) and count == pytest.approx(64.0)
    with pytest.raises(ValueError, match="protocol"):
        count_image(ones, image, rect, "nope", window=24)


def test_tiling_above_50_is_strictly_above_50():
    ones = lambda x: torch.ones(1, x.shape[-2], x.shape[-1])  # noqa: E731
    image, rect = torch.zeros(1, 3, 24, 40), torch.tensor([[0, 0, 10, 0]])  # not small: untiled first
    # untiled 960 / scale objects, the 11-pixel exemplar holds < 1.8 of them: no normalisation
    count, density = count_image(ones, image, rect, "tiling_above_50", window=24, stride=8, density_scaling=960 / 50)
    assert density.shape == (24, 40) and count == pytest.approx(50.0)
    count, density = count_image(ones, image, rect, "tiling_above_50", window=24, stride=8, density_scaling=960 / 51)
    # re-counted tiled: 9 x 960 / scale; the exemplar's 31 pixels at scale 3 still hold < 1.8 objects
    assert density.shape == (72, 120) and count == pytest.approx(9 * 51)


def test_tiled_count_normalises_by_the_exemplar_mass_at_three_times_the_scale():
    ones = lambda x: torch.ones(1, x.shape[-2], x.shape[-1])  # noqa: E731
    image, rect = torch.zeros(1, 3, 24, 40), torch.tensor([[0, 0, 8, 8]])  # 9 x 9 px: small, so tiled
    count, density = count_image(ones, image, rect, window=24, stride=8, density_scaling=100)
    # 72 * 120 / 100 objects; the rect covers rows and columns 0..24 of the tiled map: 625 / 100 = 6.25 > 1.8
    assert density.shape == (72, 120) and count == pytest.approx(72 * 120 / 625)
