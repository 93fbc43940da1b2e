import pytest
import torch

from neco.crops import box_area, intersect, overlap_boxes, sample_crop_boxes


def test_overlap_boxes_hand_case():
    boxes = torch.tensor([[0, 0, 50, 50], [25, 25, 75, 75], [0, 0, 40, 80]], dtype=torch.float64)
    sizes = [10, 20, 8]
    in_global, in_crop = overlap_boxes(boxes, sizes, num_global=2)
    assert in_global.shape == (2, 3, 4) and in_crop.shape == (3, 2, 4)
    # crop 0 vs crop 1: intersection [25, 25, 50, 50]
    torch.testing.assert_close(in_global[0, 1], torch.tensor([5.0, 5.0, 10.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(in_crop[1, 0], torch.tensor([0.0, 0.0, 10.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(in_global[1, 0], torch.tensor([0.0, 0.0, 10.0, 10.0], dtype=torch.float64))
    # a crop with itself covers its whole frame
    torch.testing.assert_close(in_global[0, 0], torch.tensor([0.0, 0.0, 10.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(in_global[1, 1], torch.tensor([0.0, 0.0, 20.0, 20.0], dtype=torch.float64))
    # non-square crop 2 [0, 0, 40, 80] (8 px output) vs global 1: intersection [25, 25, 40, 75]
    # x: 8 * 25 / 40 = 5, 8 * 40 / 40 = 8; y: 8 * 25 / 80 = 2.5, 8 * 75 / 80 = 7.5
    torch.testing.assert_close(in_crop[2, 1], torch.tensor([5.0, 2.5, 8.0, 7.5], dtype=torch.float64))
    # same intersection in global 1's frame (20 px over 50 px): [0, 0, 6, 20]
    torch.testing.assert_close(in_global[1, 2], torch.tensor([0.0, 0.0, 6.0, 20.0], dtype=torch.float64))


def test_overlap_boxes_batched_and_inverse_mapping():
    gen = torch.Generator().manual_seed(0)
    batch = torch.stack([sample_crop_boxes(120, 90, generator=gen) for _ in range(3)])
    sizes = torch.tensor([98, 98, 42, 42, 42, 42])
    in_global, in_crop = overlap_boxes(batch, sizes)
    assert in_global.shape == (3, 2, 6, 4) and in_crop.shape == (3, 6, 2, 4)
    for b in range(3):
        g1, c1 = overlap_boxes(batch[b], sizes.tolist())
        torch.testing.assert_close(in_global[b], g1)
        torch.testing.assert_close(in_crop[b], c1)
    # mapping both frames back to absolute pixels gives the same intersection
    for g in range(2):
        for c in range(6):
            gb, cb = batch[:, g], batch[:, c]
            back_g = gb[:, [0, 1, 0, 1]] + in_global[:, g, c] * (gb[:, 2:] - gb[:, :2]).repeat(1, 2) / 98
            back_c = cb[:, [0, 1, 0, 1]] + in_crop[:, c, g] * (cb[:, 2:] - cb[:, :2]).repeat(1, 2) / sizes[c]
            torch.testing.assert_close(back_g, back_c, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(back_g, intersect(gb, cb), atol=1e-4, rtol=1e-4)


def test_rejection_sampling_guarantees_overlap():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        boxes = sample_crop_boxes(200, 150, min_intersection=0.05, generator=gen)
        assert boxes.shape == (6, 4)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 150).all()
        area = 200 * 150
        assert box_area(intersect(boxes[1], boxes[0])) > 2 * 0.05 * area  # second global crop: twice the threshold
        for c in range(2, 6):
            assert (box_area(intersect(boxes[c], boxes[:2])) > 0.05 * area).all()
            assert box_area(boxes[c]) <= 0.25 * area * 1.1  # local scale range (rounding slack)


def test_impossible_overlap_raises():
    with pytest.raises(RuntimeError, match="could not sample crop"):
        sample_crop_boxes(50, 50, min_intersection=0.9, max_tries=20, generator=torch.Generator().manual_seed(0))


def test_bad_shapes():
    with pytest.raises(ValueError, match="crop_sizes has 2 entries"):
        overlap_boxes(torch.zeros(3, 4), [1, 2])


def test_second_global_crop_needs_twice_the_overlap():
    # with min_intersection 0.1 the global crops must share > 20 % of the image (the reference's doubled threshold):
    # intersections between 10 % and 20 % are common among global crops of scale (0.25, 1), so a single threshold shows
    gen = torch.Generator().manual_seed(2)
    for _ in range(60):
        boxes = sample_crop_boxes(100, 100, num_local=0, min_intersection=0.1, generator=gen)
        assert box_area(intersect(boxes[0], boxes[1])) > 0.2 * 100 * 100
