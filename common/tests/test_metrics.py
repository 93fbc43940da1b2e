import numpy as np
import pytest
import torch

from funai_common.linear import linear_probe
from funai_common.metrics import ConfusionMatrix, miou


def test_identity_hand_case():
    gt = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 0, 2])
    value, per_class = miou(gt, pred, num_classes=3, matching="identity")
    # class 0: TP 1, FP 1 (pixel 4), FN 1 (pixel 1) -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 0 -> 0.
    np.testing.assert_allclose(per_class, [1 / 3, 2 / 3, 0.0])
    assert value == pytest.approx(1 / 3)


def test_tp_fp_fn_hand_cases():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 1, 2, 255]), np.array([0, 1, 1, 1, 0, 2]))
    # pixel 1 (gt 0 -> 1): FN of 0, FP of 1; pixel 4 (gt 2 -> 0): FN of 2, FP of 0; pixel 5 ignored
    tp, fp, fn = cm.counts("identity")
    assert tp.tolist() == [1, 2, 0] and fp.tolist() == [1, 1, 0] and fn.tolist() == [1, 0, 1]
    # Hungarian on 4 clusters of 2 classes: clusters 1 -> 0 and 3 -> 1 are matched, 0 and 2 fall to class 0
    cm = ConfusionMatrix(2, num_predicted=4)
    cm.update(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 1, 2, 3, 3]))
    tp, fp, fn = cm.counts()
    assert tp.tolist() == [3, 2] and fp.tolist() == [1, 0] and fn.tolist() == [0, 1]
    assert cm.miou()[1].tolist() == pytest.approx([3 / 4, 2 / 3])  # TP / (TP + FP + FN)


def test_hungarian_undoes_a_permutation():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(3, 10, 10))
    perm = np.array([2, 0, 3, 1])
    value, per_class = miou(torch.tensor(gt), torch.tensor(perm[gt]), num_classes=4)
    assert value == pytest.approx(1.0)
    assert miou(gt, perm[gt], num_classes=4, matching="identity")[0] < 0.5


def test_absent_class_counts_as_zero_and_unmatched_predictions_go_to_zero():
    gt = np.array([0, 0, 1, 1])
    value, per_class = miou(gt, gt, num_classes=4)
    np.testing.assert_allclose(per_class, [1, 1, 0, 0])
    assert value == pytest.approx(0.5)


def test_many_to_one_merges_clusters():
    gt = np.array([0, 0, 0, 1, 1, 1])
    clusters = np.array([0, 1, 1, 2, 3, 3])
    value, _ = miou(gt, clusters, num_classes=2, matching="many_to_one", num_predicted=4)
    assert value == pytest.approx(1.0)
    hungarian, _ = miou(gt, clusters, num_classes=2, matching="hungarian", num_predicted=4)
    # Hungarian keeps one cluster per class (clusters 1 and 3); clusters 0 and 2 fall to class 0.
    # class 0: TP 2 + pixel 0 (cluster 0 -> 0) = 3, FP 1 (cluster 2) -> 3/4; class 1: TP 2, FN 1 -> 2/3.
    assert hungarian == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    gt, pred = rng.integers(0, 5, (4, 16, 16)), rng.integers(0, 5, (4, 16, 16))
    gt[:, :2] = 255
    cm = ConfusionMatrix(5)
    for g, p in zip(gt, pred):
        cm.update(g, p)
    assert cm.miou()[0] == pytest.approx(miou(gt, pred, 5)[0], abs=1e-12)


def test_ground_truth_outside_the_classes_is_an_error():
    cm = ConfusionMatrix(5, ignore_index=255)
    cm.update(np.array([0, 4, 255]), np.array([0, 1, 2]))  # the ignore value is fine
    with pytest.raises(ValueError, match=r"ground-truth ids \[20\] outside \[0, 5\)"):
        cm.update(np.array([0, 20]), np.array([0, 1]))


def test_bad_matching():
    with pytest.raises(ValueError, match="unknown matching"):
        miou([0], [0], 1, matching="greedy")


def test_linear_probe_separable():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 5
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(size=(300, 5))
    result = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert result["top1"] > 95 and result["top5"] == 100.0


def test_linear_probe_lambda_grid_is_the_mean_loss_penalty():
    """With lambdas (cyanure's (1/n) sum loss + lambda/2 |w|^2), the refit uses C = 1/(n lambda) and no intercept."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(3, 6))[y] * 2 + rng.normal(size=(300, 6))
    opts = dict(lambdas=(1e-3, 1e-1), val_fraction=0.2, fit_intercept=False, tol=1e-3, max_iter=300, standardize=False)
    result = linear_probe(x[:200], y[:200], x[200:], y[200:], **opts)
    assert result["lambda"] in (1e-3, 1e-1) and result["C"] == pytest.approx(1 / (200 * result["lambda"]))
    ref = LogisticRegression(C=result["C"], fit_intercept=False, tol=1e-3, max_iter=300, random_state=0)
    ref.fit(x[:200], y[:200])
    assert result["top1"] == pytest.approx(100 * (ref.predict(x[200:]) == y[200:]).mean())
