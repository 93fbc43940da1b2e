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
    # one-sided: over the placed (old) box's area, as the reference's compute_overlap_ratio(new, old)
    assert LayoutSampler(overlap_both=False).overlap_ratio((1, 1, 4, 4), (0, 0, 1, 1)) == pytest.approx(196 / 784)
    assert LayoutSampler(overlap_both=False).overlap_ratio((0, 0, 1, 1), (1, 1, 4, 4)) == pytest.approx(196 / 3136)


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


@pytest.mark.parametrize("outside,both", [(0.0, True), (0.3, True), (0.0, False)])
def test_valid_positions_match_the_obvious_loop(outside, both):
    s = LayoutSampler(outside_ratio=outside, overlap_both=both)
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
                fallbacks += 1  # allowed only for the minimum-size fallback (longer side = min, aspect kept)
                assert max(b[2] - b[0], b[3] - b[1]) == s.min_cells(k)
    assert fallbacks < 20


def _reference_layout(rnd, aspects, grid=16, size=224, min_fractions=(0.3, 0.2, 0.1), max_cells=16, threshold=0.5):
    """The reference recipe (spec b, "Synthetic data") with Python's `random`, for distribution comparisons."""
    lo = round(min_fractions[len(aspects) - 1] * grid)

    def extent(r, low, high):  # randint is inclusive: the longer side in [low, high - 1]
        long = rnd.randint(low, high - 1)
        return (long, max(1, round(long / r))) if r >= 1 else (max(1, round(long * r)), long)

    def pixels(b):
        return [b[0] * size // grid, b[1] * size // grid, (b[2] + 1) * size // grid, (b[3] + 1) * size // grid]

    def ratio(new, old):
        a, b = pixels(new), pixels(old)
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        return max(inter / ((a[2] - a[0]) * (a[3] - a[1])), inter / ((b[2] - b[0]) * (b[3] - b[1])))

    boxes = []
    for r in aspects:
        if not boxes:
            sx, sy = extent(r, lo, max_cells)
            x, y = rnd.randint(0, grid - sx - 1), rnd.randint(0, grid - sy - 1)
        else:
            locations, count = [], 0
            while not locations and count < 10:
                sx, sy = extent(r, lo, max_cells)
                locations = [  # fully inside the image (outside ratio 0), summed overlap <= threshold
                    (x, y)
                    for x in range(0, grid - sx)
                    for y in range(0, grid - sy)
                    if sum(ratio((x, y, x + sx, y + sy), o) for o in boxes) <= threshold
                ]
                count += 1
            if locations:
                x, y = rnd.choice(locations)
            else:  # the minimum size, aspect ratio kept, anywhere
                sx, sy = extent(r, lo, lo + 1)
                x, y = rnd.randint(0, grid - sx - 1), rnd.randint(0, grid - sy - 1)
        boxes.append((x, y, x + sx, y + sy))
    return boxes


def _mean_area_fraction(layouts):
    return float(np.mean([(b[2] - b[0] + 1) * (b[3] - b[1] + 1) / 256 for boxes in layouts for b in boxes]))


@pytest.mark.parametrize("fixed", [True, False])
def test_mean_area_fraction_of_all_objects_matches_the_reference_recipe(fixed):
    """Spec g9: mean area fraction over every pasted object (not only the first), 3 fixed objects or k ~ U{1..3},
    aspect ratios log-uniform in [0.5, 2], against an independent loop over the reference recipe."""
    import random

    s = LayoutSampler()
    rng, rnd = np.random.default_rng(2), random.Random(3)
    ours, ref = [], []
    for _ in range(700):
        for out, sample in ((ours, lambda a: s.sample(rng, a)), (ref, lambda a: _reference_layout(rnd, a))):
            k = 3 if fixed else int(rng.integers(1, 4))
            out.append(sample(np.exp(rng.uniform(np.log(0.5), np.log(2), size=k)).tolist()))
    assert _mean_area_fraction(ours) == pytest.approx(_mean_area_fraction(ref), abs=0.012)
    if fixed:  # later objects are smaller than the first: placement needs room
        assert np.mean([(b[2] - b[0] + 1) * (b[3] - b[1] + 1) for bs in ours for b in bs[1:]]) < np.mean(
            [(bs[0][2] - bs[0][0] + 1) * (bs[0][3] - bs[0][1] + 1) for bs in ours]
        )


def test_fallback_keeps_the_aspect_ratio_at_the_minimum_size():
    # no position is ever valid: every object after the first falls back to the minimum size (reference:
    # sample_size(ratio, grid_min, grid_min + 1)), the longer side = min cells, the shorter one round(min / ratio)
    s = LayoutSampler(overlap_threshold=-1.0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        boxes = s.sample(rng, [1.0, 2.0, 0.5])  # k = 3: min extent 2
        assert [(b[2] - b[0], b[3] - b[1]) for b in boxes[1:]] == [(2, 1), (1, 2)]
        assert all(0 <= v <= 15 for b in boxes for v in b)
    boxes = LayoutSampler(overlap_threshold=-1.0).sample(rng, [1.0, 1.6])  # k = 2: min 3, round(3 / 1.6) = 2
    assert (boxes[1][2] - boxes[1][0], boxes[1][3] - boxes[1][1]) == (3, 2)


def test_extents_the_grid_cannot_hold_are_errors_naming_the_keys():
    """codec.grid=8 with the default data.max_cells=16 drew boxes wider than the grid and failed in numpy ("high <=
    0"); a minimum extent above max_cells - 1 likewise."""
    with pytest.raises(ValueError, match=r"^data.max_cells=16: expected 2 to codec.grid=8"):
        LayoutSampler(grid=8, max_cells=16)
    with pytest.raises(ValueError, match=r"1 object\(s\) get a minimum extent of round\(0.9 x codec.grid=16\) = 14"):
        LayoutSampler(min_fractions=(0.9,), max_cells=10)
    boxes = LayoutSampler(grid=8, max_cells=8).sample(np.random.default_rng(0), [1.0, 0.5, 2.0])
    assert all(0 <= v <= 7 for box in boxes for v in box)
