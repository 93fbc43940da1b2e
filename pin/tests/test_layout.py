import numpy as np
import pytest

from pin.layout import LayoutSampler


def test_min_and_max_cells():
    s = LayoutSampler()
    assert [s.min_cells(k) for k in (1, 2, 3)] == [5, 3, 2]
    assert s.max_cells == 16
    with pytest.raises(ValueError, match="min_fractions"):
        s.min_cells(4)


def test_overlap_ratio_hand_computed():
    s = LayoutSampler()
    # new box cells 0..1 (28x28 px), old box cells 1..4 (56x56 px): intersection 14x14
    assert s.overlap_ratio((0, 0, 1, 1), (1, 1, 4, 4)) == pytest.approx(196 / 784)
    assert LayoutSampler(overlap_both=True).overlap_ratio((1, 1, 4, 4), (0, 0, 1, 1)) == pytest.approx(196 / 784)
    assert LayoutSampler(overlap_both=False).overlap_ratio((1, 1, 4, 4), (0, 0, 1, 1)) == pytest.approx(196 / 3136)


def _slow_positions(s, extent, placed):
    sx, sy = extent
    out = []
    for y in range(-sy, s.grid - 1):
        for x in range(-sx, s.grid - 1):
            box = (x, y, x + sx, y + sy)
            if s.outside_fraction(box) > s.outside_ratio:
                continue
            if sum(s.overlap_ratio(box, o) for o in placed) <= s.overlap_threshold:
                out.append((x, y))
    return out


@pytest.mark.parametrize("outside", [0.0, 0.3])
def test_valid_positions_match_the_obvious_loop(outside):
    s = LayoutSampler(outside_ratio=outside)
    for extent, placed in [((3, 2), []), ((5, 5), [(0, 0, 6, 6)]), ((2, 7), [(0, 0, 6, 6), (8, 3, 15, 10)])]:
        assert s.valid_positions(extent, placed) == _slow_positions(s, extent, placed)
    assert len(s.valid_positions((3, 2), [])) == (13 * 14 if outside == 0 else len(_slow_positions(s, (3, 2), [])))


def _expected_first_area(min_cells, grid=16, steps=20001):
    """E[(s_x+1)(s_y+1)] / G^2 by quadrature over log-uniform aspect in [0.5, 2] (symmetric: r >= 1 suffices)."""
    u = np.linspace(0, np.log(2), steps)
    total = 0.0
    sizes = range(min_cells, grid)
    for s in sizes:
        other = np.maximum(1, np.round(s / np.exp(u)))
        total += np.trapezoid((s + 1) * (other + 1), u) / np.log(2)
    return total / len(sizes) / grid**2


def test_first_object_area_distribution():
    s = LayoutSampler()
    rng = np.random.default_rng(0)
    for k in (1, 3):
        areas = []
        for _ in range(3000 if k == 1 else 1500):
            aspects = np.exp(rng.uniform(np.log(0.5), np.log(2), size=k))
            b = s.sample(rng, aspects)[0]
            areas.append((b[2] - b[0] + 1) * (b[3] - b[1] + 1) / 256)
        assert np.mean(areas) == pytest.approx(_expected_first_area(s.min_cells(k)), abs=0.015)


def test_layout_statistics_over_many_compositions():
    s = LayoutSampler()
    rng = np.random.default_rng(1)
    fallbacks = 0
    for _ in range(400):
        k = int(rng.integers(1, 4))
        aspects = np.exp(rng.uniform(np.log(0.5), np.log(2), size=k))
        boxes = s.sample(rng, aspects)
        assert len(boxes) == k
        for i, b in enumerate(boxes):
            assert 0 <= b[0] <= b[2] <= 15 and 0 <= b[1] <= b[3] <= 15  # inside the image
            p = s.pixel_box(b)
            assert (p[2] - p[0]) * (p[3] - p[1]) >= 32**2  # never COCO-"small"
            assert max(b[2] - b[0], b[3] - b[1]) >= s.min_cells(k)
            if sum(s.overlap_ratio(b, o) for o in boxes[:i]) > 0.5:
                fallbacks += 1  # allowed only for the minimum-size fallback
                assert b[2] - b[0] == b[3] - b[1] == s.min_cells(k)
    assert fallbacks < 20
