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


def test_hungarian_maximises_iou_not_overlap_or_dice():
    # gt [0, 1, 1, 1, 1], pred [1, 0, 1, 1, 1]: identity gives IoUs (0, 3/5), mean 0.3; the swap gives (1/4, 1/4).
    # A Dice-like score TP / (|gt| + |pred|) would prefer the swap (1/5 + 1/5 > 0 + 3/8).
    value, per_class = miou(np.array([0, 1, 1, 1, 1]), np.array([1, 0, 1, 1, 1]), num_classes=2)
    np.testing.assert_allclose(per_class, [0.0, 3 / 5])
    assert value == pytest.approx(0.3)
    # gt [0, 0, 1 x 7], pred [0 x 7, 1, 1]: identity overlaps 2 + 2 pixels, IoUs (2/7, 2/7); the swap overlaps 0 + 5
    # pixels (more) but scores (0, 5/9), a lower mean: Hungarian keeps the identity.
    gt, pred = np.array([0, 0] + [1] * 7), np.array([0] * 7 + [1, 1])
    value, per_class = miou(gt, pred, num_classes=2)
    np.testing.assert_allclose(per_class, [2 / 7, 2 / 7])


def test_many_to_one_goes_by_overlap_not_by_recall():
    # 10 pixels of class 0, 2 of class 1; cluster 0 holds 4 of class 0 and both of class 1 -> class 0 (4 > 2 pixels,
    # though it holds all of class 1 and only 40 % of class 0); cluster 1 holds 6 of class 0 -> class 0.
    gt = np.array([0] * 10 + [1] * 2)
    pred = np.array([0] * 4 + [1] * 6 + [0] * 2)
    value, per_class = miou(gt, pred, num_classes=2, matching="many_to_one")
    np.testing.assert_allclose(per_class, [10 / 12, 0.0])  # everything predicted class 0
    assert value == pytest.approx(5 / 12)


def test_predicted_ids_outside_the_range_are_left_out():
    # a negative id or one >= num_predicted must not land in another cell of the flat confusion matrix
    cm = ConfusionMatrix(2, ignore_index=None)
    cm.update(np.array([1, 1, 0, 0]), np.array([-1, 0, 2, 0]))
    assert cm.matrix.tolist() == [[1, 0], [1, 0]]


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


def _majority_or_boundary_case():
    """1-D training set: class 0 at -2..-0.25 (8 points), class 1 at 1..2.5 (4 points). With lambda = 100 the weight is
    crushed to ~0 and the unpenalised intercept, log(4/8), predicts the majority class 0 everywhere; with lambda = 1e-3
    the boundary lies between the classes, so x = 2 and x = 3 are predicted 1."""
    x = np.array([-2.0, -1.75, -1.5, -1.25, -1.0, -0.75, -0.5, -0.25, 1.0, 1.5, 2.0, 2.5])[:, None]
    y = np.array([0] * 8 + [1] * 4)
    return x, y, dict(lambdas=(100.0, 1e-3), standardize=False)


@pytest.mark.parametrize("val_label, winner", [(1, 1e-3), (0, 100.0)])
def test_linear_probe_chooses_lambda_on_the_given_validation_split(val_label, winner):
    from sklearn.linear_model import LogisticRegression

    x, y, opts = _majority_or_boundary_case()
    far = np.array([[2.0], [3.0]])  # labelled 1: only the boundary is right; labelled 0: only the majority vote is
    result = linear_probe(x, y, x, y, val_features=far, val_labels=[val_label] * 2, **opts)
    assert result["lambda"] == winner
    assert result["C"] == pytest.approx(1 / (12 * winner))  # n = the training split only: the final fit is on it
    ref = LogisticRegression(C=1 / (12 * winner), random_state=0).fit(x, y)
    assert result["top1"] == pytest.approx(100 * (ref.predict(x) == y).mean())
    # the 80/20 split of train would have kept the boundary: with the given split a majority vote can win instead
    assert linear_probe(x, y, x, y, val_fraction=0.25, **opts)["lambda"] == 1e-3


def test_linear_probe_given_split_equals_the_drawn_80_20_split():
    """Passing as validation the 20 % that the default path draws (same seed, stratified) chooses the same lambda;
    only the final fit differs (all of train there, the 80 % here), hence C = 1/(n lambda) with the two n."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 150)
    x = rng.normal(size=(3, 8))[y] * 0.7 + rng.normal(size=(150, 8))
    opts = dict(lambdas=(3.0, 3e-1, 1e-2, 1e-4), val_fraction=0.2, fit_intercept=False, standardize=False, seed=5)
    drawn = linear_probe(x[:100], y[:100], x[100:], y[100:], **opts)
    x_fit, x_val, y_fit, y_val = train_test_split(x[:100], y[:100], test_size=0.2, random_state=5, stratify=y[:100])
    given = linear_probe(x_fit, y_fit, x[100:], y[100:], val_features=x_val, val_labels=y_val, **opts)
    assert given["lambda"] == drawn["lambda"] != opts["lambdas"][0]  # not a tie resolved to the first candidate
    assert (drawn["C"], given["C"]) == pytest.approx((1 / (100 * drawn["lambda"]), 1 / (80 * drawn["lambda"])))


def test_linear_probe_validation_errors():
    x, y, opts = _majority_or_boundary_case()
    with pytest.raises(ValueError, match="pass both or neither"):
        linear_probe(x, y, x, y, val_features=x, **opts)
    with pytest.raises(ValueError, match=r"shape \(3, 2\) with 3 labels; expected \(M, 1\)"):
        linear_probe(x, y, x, y, val_features=np.zeros((3, 2)), val_labels=[0, 1, 0], **opts)
    with pytest.raises(ValueError, match="with 2 labels"):
        linear_probe(x, y, x, y, val_features=np.zeros((3, 1)), val_labels=[0, 1], **opts)


def test_linear_probe_takes_bfloat16_features():
    """Features computed under bf16 autocast: numpy has no bfloat16, so they are widened before sklearn."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 5
    y = rng.integers(0, 3, 300)
    x = torch.from_numpy(centres[y] + rng.normal(size=(300, 5))).bfloat16()
    result = linear_probe(x[:200], torch.from_numpy(y[:200]), x[200:], torch.from_numpy(y[200:]), C=1.0)
    assert result["top1"] > 95


def test_linear_probe_candidates_use_the_size_of_the_fit_part(monkeypatch):
    """Each lambda candidate is fitted on the (1 - val_fraction) part with C = 1/(n_fit lambda); the default
    val_fraction 0.1 leaves 90 of 100 items; the stratified split keeps the class balance (45 + 45)."""
    import funai_common.linear as linear

    fits = []
    real_fit = linear._fit

    def spy(features, labels, C, **kw):
        fits.append((len(labels), np.bincount(labels).tolist(), C))
        return real_fit(features, labels, C, **kw)

    monkeypatch.setattr(linear, "_fit", spy)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    x = y[:, None] + rng.normal(size=(100, 3))
    linear.linear_probe(x, y, x, y, lambdas=(1e-2, 1e-1), standardize=False)
    assert [f[:2] for f in fits[:2]] == [(90, [45, 45])] * 2
    assert [f[2] for f in fits[:2]] == pytest.approx([1 / (90 * 1e-2), 1 / (90 * 1e-1)])
    assert fits[2][0] == 100  # the refit on all of train


def test_linear_probe_standardises_with_the_training_statistics():
    # 1-D, classes at -1 and +1, no intercept: after centring, the boundary sits at the mean used for it. Test points
    # 0.6..1.2 are all class 1: centred with the training mean (~0) they are all right of the boundary; centred with
    # their own mean (0.9), half would fall on the wrong side.
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    x = (2.0 * y - 1.0 + 0.3 * rng.normal(size=40))[:, None]
    test = np.array([[0.6], [0.8], [1.0], [1.2]])
    assert linear_probe(x, y, test, np.ones(4), C=1.0, fit_intercept=False)["top1"] == 100.0
    mean, std = x.mean(), x.std()
    ref = LogisticRegression(C=1.0, fit_intercept=False, random_state=0).fit((x - mean) / std, y)
    assert (ref.predict((test - mean) / std) == 1).all()


def test_linear_probe_top5_against_sklearn_probabilities():
    """7 overlapping classes: top-5 is the share of test labels among the 5 most probable classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    y = rng.integers(0, 7, 280)
    x = rng.normal(size=(7, 4))[y] + 1.5 * rng.normal(size=(280, 4))
    result = linear_probe(x[:200], y[:200], x[200:], y[200:], C=1.0)
    scaler = StandardScaler().fit(x[:200])
    ref = LogisticRegression(C=1.0, random_state=0).fit(scaler.transform(x[:200]), y[:200])
    ranking = np.argsort(-ref.predict_proba(scaler.transform(x[200:])), axis=1)
    hits = ranking == y[200:, None]
    assert result["top1"] == pytest.approx(100 * hits[:, 0].mean())
    assert result["top5"] == pytest.approx(100 * hits[:, :5].any(1).mean())
    assert hits[:, :5].any(1).mean() > hits[:, :3].any(1).mean() > hits[:, 0].mean()  # the window size matters
