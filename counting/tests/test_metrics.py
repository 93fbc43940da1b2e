import math

import numpy as np
import pytest
import torch

from counting.metrics import count_metrics, kendall_tau


def test_overall_and_subsets_by_hand():
    gt = [5, 16, 17, 40, 41, 100]
    pred = [7, 16, 20, 36, 41, 90]  # errors 2, 0, 3, -4, 0, -10
    m = count_metrics(pred, gt)
    assert m["mae"] == pytest.approx(19 / 6)
    assert m["rmse"] == pytest.approx(math.sqrt((4 + 9 + 16 + 100) / 6))
    assert m["low"] == pytest.approx({"mae": 1.0, "rmse": math.sqrt(2)})
    assert m["medium"] == pytest.approx({"mae": 3.5, "rmse": math.sqrt(12.5)})
    assert m["high"] == pytest.approx({"mae": 5.0, "rmse": math.sqrt(50)})


def test_input_types_agree_and_empty_subset_is_nan():
    a = count_metrics(torch.tensor([1.0, 2.0]), np.array([3, 4]))
    b = count_metrics([1, 2], [3, 4])
    assert a["mae"] == b["mae"] == 2.0
    assert math.isnan(a["high"]["mae"]) and math.isnan(a["medium"]["rmse"])


def test_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        count_metrics([1, 2], [1])


def test_kendall_tau_perfect_order():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)


def test_images_without_objects_are_in_the_low_subset():
    m = count_metrics([2.0, 10.0, 30.0], [0, 16, 20])  # errors 2, -6 (low), 10 (medium)
    assert m["low"] == pytest.approx({"mae": 4.0, "rmse": math.sqrt(20)})
    assert m["medium"] == pytest.approx({"mae": 10.0, "rmse": 10.0})
