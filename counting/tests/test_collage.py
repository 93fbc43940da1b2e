import numpy as np
import pytest
import torch

from counting.collage import CollageConfig, SelfCollageDataset, SelfCollageGenerator, cut_object, sample_sizes
from counting.density import point_map
from counting.pools import TensorBackgroundPool, TensorObjectPool
from counting.resize import shorter_side_size


def simple_pool(num_clusters: int = 4, per_cluster: int = 20, size: int = 16) -> TensorObjectPool:
    """Square objects whose mask is the inner square; colour encodes the cluster."""
    images, masks, ids = [], [], []
    for c in range(num_clusters):
        for _ in range(per_cluster):
            image = torch.zeros(3, size, size)
            image[c % 3] = 0.2 + 0.2 * c
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[2:-2, 2:-2] = True
            images.append(image)
            masks.append(mask)
            ids.append(10 + c)
    return TensorObjectPool(images, masks, ids)


@pytest.fixture(scope="module")
def generator() -> SelfCollageGenerator:
    backgrounds = TensorBackgroundPool([torch.rand(3, 40, 50), torch.rand(3, 70, 60)])
    cfg = CollageConfig(img_size=64, object_size=16, exemplar_size=16)
    return SelfCollageGenerator(simple_pool(), backgrounds, cfg)


def test_shorter_side_rule():
    assert shorter_side_size(10, 20, 5, 6) == (3, 6)  # long 10 > 6 -> long 6, short int(6 * 5 / 10)
    assert shorter_side_size(20, 10, 5, 6) == (6, 3)
    assert shorter_side_size(10, 10, 5, 6) == (5, 5)
    assert shorter_side_size(10, 11, 5, 6) == (5, 5)  # int(5 * 11 / 10) = 5


def test_cut_object_crops_to_the_mask_box():
    image, mask = torch.rand(3, 20, 20), torch.zeros(20, 20, dtype=torch.bool)
    mask[4:8, 5:13] = True  # 4 x 8 box -> shorter side 6, longer 12 > 7 -> (3, 7)
    cut, cut_mask = cut_object(image, mask, 6)
    assert cut.shape == (3, 3, 7) and cut_mask.shape == (3, 7) and cut_mask.all()


def test_sizes_are_correlated_and_in_range():
    rng = np.random.default_rng(0)
    cfg = CollageConfig()
    draws = [sample_sizes(rng, 20, cfg) for _ in range(3000)]
    flat = np.concatenate(draws)
    assert flat.min() == 11 and flat.max() == 88  # m in [15, 69], spread [-int(0.3 m), int(0.3 m) - 1]
    spreads = np.array([max(d) - min(d) for d in draws])
    means = np.array([np.mean(d) for d in draws])
    assert (spreads <= 2 * np.floor(0.3 * 69) - 1).all()
    assert abs(np.corrcoef(means, spreads)[0, 1]) > 0.5  # larger objects spread more: a per-collage mean size


def test_sizes_scale_with_the_collage_size():
    # the same draws at img_size 112 are the 224-px sizes halved (truncated): int(s * 112 / 224)
    full = sample_sizes(np.random.default_rng(5), 20, CollageConfig())
    half = sample_sizes(np.random.default_rng(5), 20, CollageConfig(img_size=112))
    assert half == [s // 2 for s in full] and max(full) > 1


def test_collage_statistics(generator):
    counts, masses = [], []
    pool_ids = generator.objects.cluster_ids
    for i in range(300):
        s = generator.sample(np.random.default_rng([7, i]))
        t = int(s["count"])
        counts.append(t)
        assert s["all_boxes"].shape == (20, 4) and int(s["is_target"].sum()) == t
        assert not s["is_target"][: 20 - t].any() and s["is_target"][20 - t :].all()  # distractors pasted first
        target_cluster, distractor_cluster = s["clusters"].tolist()
        assert target_cluster != distractor_cluster
        ids = pool_ids[s["objects"].numpy()]
        assert (ids[20 - t :] == target_cluster).all() and (ids[: 20 - t] == distractor_cluster).all()
        assert len(set(s["objects"].tolist())) == 20
        boxes = s["all_boxes"]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        assert (s["boxes"][:t] >= 0).all() and (s["boxes"][t:] == -1).all()
        assert torch.allclose(s["boxes"][:t] * 64, boxes[20 - t :].flip(0))  # targets, last pasted first
        distinct = float(point_map(boxes[20 - t :], 64, 64, 1.0).sum())
        masses.append((float(s["density"].sum()) / 3000.0, distinct))
        assert s["exemplars"].shape == (3, 3, 16, 16) and s["image"].shape == (3, 64, 64)
    counts = np.array(counts)
    assert counts.min() == 3 and counts.max() == 19
    assert abs(counts.mean() - 11) < 0.8 and abs(counts.std() - np.sqrt((17**2 - 1) / 12)) < 0.6
    errors = np.array([abs(m - d) for m, d in masses])
    assert np.median(errors) < 3e-3  # density mass = distinct target centres except near borders


def test_exemplars_are_the_last_pasted_targets():
    """As the reference (copy_targets_last flips its box list), the exemplars are crops of the last three pasted
    targets, the top-most one first: no later object covers them."""
    gen = torch.Generator().manual_seed(0)
    textured = simple_pool()  # random textures: every object, and so every crop, differs
    textured.images = [torch.rand(3, 16, 16, generator=gen) for _ in textured.images]
    cfg = CollageConfig(img_size=64, object_size=16, exemplar_size=16)
    generator = SelfCollageGenerator(textured, TensorBackgroundPool([torch.rand(3, 40, 50, generator=gen)]), cfg)
    for i in range(20):
        s = generator.sample(np.random.default_rng([11, i]))
        last_three = s["all_boxes"][-3:].flip(0)  # targets are pasted last; the final object comes first
        assert s["is_target"][-3:].all()
        for k, (x0, y0, x1, y1) in enumerate(last_three.long().tolist()):
            crop = s["image"][None, :, y0:y1, x0:x1]
            crop = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False)[0]
            assert torch.allclose(s["exemplars"][k], crop, atol=1e-6)


def test_wide_objects_are_placed_anywhere_inside_the_canvas():
    """x0 ~ U{0..S-w}, y0 ~ U{0..S-h}: non-square objects stay inside the canvas and reach all four edges."""
    pool = simple_pool()
    for mask in pool.masks:
        mask[:] = False
        mask[6:10, 1:15] = True  # a wide 4 x 14 mask box
    cfg = CollageConfig(img_size=64, object_size=16, exemplar_size=16)
    gen = SelfCollageGenerator(pool, TensorBackgroundPool([torch.rand(3, 40, 50)]), cfg)
    boxes = torch.cat([gen.sample(np.random.default_rng([5, i]))["all_boxes"] for i in range(40)])
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (widths > 2 * heights).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
    assert boxes[:, 2].max() == 64 and boxes[:, 3].max() == 64 and boxes[:, 0].min() == 0 and boxes[:, 1].min() == 0


def test_density_sum_equals_count_at_224():
    backgrounds = TensorBackgroundPool([torch.rand(3, 64, 64)])
    gen = SelfCollageGenerator(simple_pool(size=32), backgrounds, CollageConfig(object_size=32))
    errors = []
    for i in range(20):
        s = gen.sample(np.random.default_rng(i))
        t = int(s["count"])
        distinct = float(point_map(s["all_boxes"][20 - t :], 224, 224, 1.0).sum())
        errors.append(abs(float(s["density"].sum()) / 3000 - distinct))
        assert abs(float(s["density_all"].sum()) / 3000 - 20) < 1.0
    assert np.median(errors) < 3e-3


def test_seeded_and_worker_independent(generator):
    ds = SelfCollageDataset(generator, samples_per_epoch=10, seed=3)
    a, b = ds[12], ds[12]  # epoch 1, sample 2
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["density"], b["density"])
    assert not torch.equal(ds[2]["image"], a["image"])


def test_pool_without_large_cluster_is_rejected():
    with pytest.raises(ValueError, match="no cluster has 19 objects"):
        SelfCollageGenerator(simple_pool(per_cluster=5), TensorBackgroundPool([torch.rand(3, 8, 8)]))
