import numpy as np
import pytest
import torch
import torchvision

from pin.boxes import GridCodec
from pin.metrics import batch_weighted_miou, localisation_miou, paired_iou, precision_at


def test_iou_hand_computed():
    iou = paired_iou(
        [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], [[5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10]]
    )
    assert iou.tolist() == pytest.approx([25 / 175, 0.0, 1.0])


def test_iou_matches_torchvision_box_iou():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 4, generator=g) * 224
    b = torch.rand(50, 4, generator=g) * 224
    a = torch.cat([a[:, :2].minimum(a[:, 2:]), a[:, :2].maximum(a[:, 2:])], 1)
    b = torch.cat([b[:, :2].minimum(b[:, 2:]), b[:, :2].maximum(b[:, 2:])], 1)
    ref = torchvision.ops.box_iou(a.double(), b.double()).diagonal()
    assert torch.allclose(paired_iou(a, b), ref)


def test_bins_at_their_thresholds():
    gt = [[0, 0, 32, 32], [0, 0, 32, 31.99], [0, 0, 96, 96], [0, 0, 96, 95.99]]  # 1024 -> M, <1024 -> S, 9216 -> L
    pred = [[0, 0, 32, 32], [0, 0, 1, 1], [0, 0, 48, 96], [0, 0, 96, 95.99]]
    out = localisation_miou(pred, gt)
    assert out["num_s"] == 1 and out["num_m"] == 2 and out["num_l"] == 1
    assert out["miou_l"] == pytest.approx(0.5)
    assert out["miou_s"] == pytest.approx(1 / (32 * 31.99))
    assert out["miou_m"] == pytest.approx(1.0)
    assert out["miou"] == pytest.approx((1 + 1 / (32 * 31.99) + 0.5 + 1) / 4)


def test_bins_scale_with_image_size():
    # at 448 px the small/medium threshold is 64^2 = 4096
    out = localisation_miou(np.array([[0, 0, 64, 64], [0, 0, 63, 64]]), np.array([[0, 0, 64, 64], [0, 0, 63, 64]]), 448)
    assert (out["num_s"], out["num_m"], out["num_l"]) == (1, 1, 0)


def test_empty_bins_are_none():
    out = localisation_miou([[0, 0, 100, 100]], [[0, 0, 100, 100]])
    assert out["miou_s"] is None and out["miou_m"] is None and out["miou_l"] == 1.0


def test_batch_weighting_differs_from_pooled_bins():
    big, mid = [0, 0, 100, 100], [0, 0, 40, 40]
    b1 = ([big, [0, 0, 20, 40]], [big, mid])  # L iou 1, M iou 0.5
    b2 = ([[0, 0, 40, 20], [0, 0, 40, 40], [0, 0, 40, 40]], [mid, mid, mid])  # M ious 0.5, 1, 1
    w = batch_weighted_miou([b1, b2])
    # per-batch M means 0.5 and 2.5/3 weighted by batch sizes 2 and 3
    assert w["miou_m"] == pytest.approx((2 * 0.5 + 3 * (2.5 / 3)) / 5)
    assert w["miou_l"] == pytest.approx(1.0)
    pooled = localisation_miou(b1[0] + b2[0], b1[1] + b2[1])
    assert pooled["miou_m"] == pytest.approx(3.0 / 4)
    assert w["miou"] == pytest.approx(pooled["miou"])


def test_miou_grid_against_hand_computed_boxes():
    codec = GridCodec()  # 14-px cells
    on_grid, off_grid = [28, 42, 84, 112], [20, 30, 60, 100]  # the latter snaps to [14, 28, 70, 112]
    pred = [[28, 42, 56, 112], [14, 28, 70, 112]]
    out = localisation_miou(pred, [on_grid, off_grid], codec=codec)
    # on grid: IoU = IoU_grid = (28*70) / (56*70) = 0.5
    # off grid: the GT (40*70 = 2800) lies inside the prediction (56*84 = 4704): IoU = 2800/4704 = 25/42; the
    # prediction is the snapped GT itself: IoU_grid = 1
    assert out["miou"] == pytest.approx((0.5 + 25 / 42) / 2)
    assert out["miou_grid"] == pytest.approx((0.5 + 1) / 2)
    grid_only = localisation_miou(pred[:1], [on_grid], codec=codec)
    assert grid_only["miou_grid"] == grid_only["miou"] == pytest.approx(0.5)
    assert "miou_grid" not in localisation_miou(pred, [on_grid, off_grid])
    # batch-weighted with per-batch weights = object counts: the overall figure equals the pooled one
    w = batch_weighted_miou([(pred[:1], [on_grid]), (pred[1:] * 2, [off_grid, [0, 0, 14, 14]])], codec=codec)
    # second batch: 1 and IoU([14,28,70,112], [0,0,14,14]) = 0 -> mean 0.5; (1 * 0.5 + 2 * 0.5) / 3
    assert w["miou_grid"] == pytest.approx(0.5)


def test_precision_at_threshold():
    assert precision_at([[0, 0, 10, 10], [0, 0, 10, 10]], [[0, 0, 10, 10], [50, 50, 60, 60]]) == pytest.approx(50.0)
    # IoU exactly at the threshold counts as a hit: 30 / 100 = 0.3 and 50 / 100 = 0.5
    assert precision_at([[0, 0, 3, 10], [0, 0, 2, 10]], [[0, 0, 10, 10], [0, 0, 10, 10]]) == pytest.approx(50.0)
    assert precision_at([[0, 0, 5, 10]], [[0, 0, 10, 10]], threshold=0.5) == pytest.approx(100.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must both be"):
        paired_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_metrics_take_tensors_that_need_grad():
    """Tensor boxes go to numpy for the size bins: they are detached (and moved to the CPU) first."""
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 100.0, 100.0]], requires_grad=True)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 50.0, 100.0]])
    out = localisation_miou(pred, gt)
    assert out["miou"] == pytest.approx(0.75) and out["num_s"] == 1 and out["num_m"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_take_cuda_tensors():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 100.0, 100.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 50.0, 100.0]])
    assert localisation_miou(pred.cuda(), gt.cuda()) == localisation_miou(pred, gt)
    assert precision_at(pred.cuda(), gt.cuda()) == precision_at(pred, gt)
