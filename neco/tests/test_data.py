import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from neco.data import MultiCropDataset, StepBatchSampler, build_image_dataset, collate_multicrop, imagenet100_classes
from neco.eval import hummingbird_memory_images, linear_train_images, train_subset


class _Images:
    def __init__(self, n=5, w=120, h=90):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_multicrop_sample_is_deterministic_and_matches_its_boxes():
    images = _Images()
    ds = MultiCropDataset(images, global_size=28, local_size=14, seed=3)
    crops, boxes = ds[(1, 2)]
    again, boxes2 = ds[(1, 2)]
    assert torch.equal(boxes, boxes2) and all(torch.equal(a, b) for a, b in zip(crops, again))
    other, boxes3 = ds[(2, 2)]  # another epoch draws other crops
    assert not torch.equal(boxes, boxes3)
    assert [tuple(c.shape) for c in crops] == [(3, 28, 28)] * 2 + [(3, 14, 14)] * 4
    # without photometric augmentation every crop is exactly its box resized (no flips, no hidden offsets)
    ds.photometric = T.ToTensor()
    crops, boxes = ds[(1, 2)]
    for crop, box, size in zip(crops, boxes.tolist(), ds.sizes):
        expected = T.ToTensor()(images[2].resize((size, size), Image.BILINEAR, box=tuple(box)))
        torch.testing.assert_close(crop, expected)
    batch_crops, batch_boxes = collate_multicrop([ds[(0, 0)], ds[(0, 1)]])
    assert batch_boxes.shape == (2, 6, 4) and batch_crops[0].shape == (2, 3, 28, 28)


def test_step_batch_sampler_splits_global_batches_and_resumes():
    one = StepBatchSampler(10, 4, seed=1)
    it = iter(one)
    batches = [next(it) for _ in range(5)]  # 2 per epoch: crosses two epoch boundaries
    assert [b[0][0] for b in batches] == [0, 0, 1, 1, 2]
    assert len({i for _, i in batches[0] + batches[1]}) == 8  # no repeats within an epoch
    ranks = [iter(StepBatchSampler(10, 4, seed=1, rank=r, world=2)) for r in range(2)]
    for step in range(5):
        assert next(ranks[0]) + next(ranks[1]) == batches[step]
    resumed = iter(StepBatchSampler(10, 4, seed=1, start_step=3))
    assert next(resumed) == batches[3]
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(10, 3, seed=0, world=2)
    with pytest.raises(ValueError, match="smaller than optim.batch_size"):
        StepBatchSampler(3, 4, seed=0)


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data.dataset 'cifar'"):
        build_image_dataset({"dataset": "cifar", "root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="ImageNet training images not found.*train"):
        build_image_dataset({"dataset": "imagenet", "root": str(tmp_path)})


@pytest.mark.parametrize("name", ["coco", "imagenet", "imagenet100", "voc", "folder"])
def test_dataset_without_root_is_a_clear_error(name):
    # `neco-train --config tiny data.dataset=coco` (tiny.yaml has data.root: null) was a TypeError from os.path.join
    with pytest.raises(ValueError, match=f"data.dataset='{name}' needs data.root=/path"):
        build_image_dataset({"dataset": name, "root": None})


def test_train_subset():
    data = list(range(256))
    sub = train_subset(data, 1 / 128)
    assert len(sub) == 2 and set(sub) <= set(data)
    assert train_subset(data, 1.0) is data
    with pytest.raises(ValueError, match="train_fraction"):
        train_subset(data, 0)


@pytest.mark.parametrize(
    "dataset, fraction, expected",
    [("coco-things", None, 26), ("coco-stuff", None, 26), ("voc", None, 256), ("ade20k", None, 256), ("voc", 0.5, 128)],
)
def test_linear_head_trains_on_the_references_share_of_images(dataset, fraction, expected):
    """The reference's linear_finetune.py keeps a random 10 % of COCO train2017 (round(256 * 0.1) = 26 here)."""
    data = list(range(256))
    cfg = {"data": {"dataset": dataset}, "linear": {"train_fraction": fraction}}
    sub = linear_train_images(data, cfg)
    assert len(sub) == expected and len(set(sub)) == expected and set(sub) <= set(data)
    if expected < 256:
        assert list(sub) != data[:expected]  # random, not the first images
    assert len(linear_train_images(data, {"data": {"dataset": dataset}, "linear": {}})) == (  # an older config
        expected if fraction is None else 256
    )
    with pytest.raises(ValueError, match=r"linear.train_fraction must be in \(0, 1\], got 1.5"):
        linear_train_images(data, {"data": {"dataset": dataset}, "linear": {"train_fraction": 1.5}})


def test_imagenet100_reads_only_the_listed_classes(tmp_path):
    colours = {"n01": 10, "n02": 20, "n03": 30}
    for wnid, value in colours.items():
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (value + i,) * 3).save(tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG")
    with pytest.raises(FileNotFoundError, match=r"imagenet100\.txt"):
        build_image_dataset({"dataset": "imagenet100", "root": str(tmp_path)})
    (tmp_path / "imagenet100.txt").write_text("n03\nn01\n\n")
    data = build_image_dataset({"dataset": "imagenet100", "root": str(tmp_path)})
    assert [data[i].getpixel((0, 0))[0] for i in range(len(data))] == [30, 31, 10, 11]  # listed order, n02 left out
    assert len(build_image_dataset({"dataset": "imagenet", "root": str(tmp_path)})) == 6
    (tmp_path / "imagenet100.txt").write_text("n03\nn04\n")
    with pytest.raises(ValueError, match=r"imagenet100\.txt.*\['n04'\]"):
        build_image_dataset({"dataset": "imagenet100", "root": str(tmp_path)})
    # an extracted subset of exactly 100 class folders needs no list
    (tmp_path / "imagenet100.txt").unlink()
    for i in range(100 - len(list((tmp_path / "train").iterdir()))):
        (tmp_path / "train" / f"x{i:03d}").mkdir()
    assert imagenet100_classes(str(tmp_path))[:3] == ["n01", "n02", "n03"]


def test_combined_training_sets_concatenate_in_the_named_order(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (100 + 50 * i,) * 3).save(
            tmp_path / "coco" / "train2017" / f"{i:012d}.jpg", quality=100
        )
    for wnid, value in (("n01", 10), ("n02", 60)):
        (tmp_path / "in100" / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8), (value,) * 3).save(tmp_path / "in100" / "train" / wnid / f"{wnid}_0.JPEG", quality=100)
    (tmp_path / "in100" / "imagenet100.txt").write_text("n02\nn01\n")
    roots = [str(tmp_path / "coco"), str(tmp_path / "in100")]
    data = build_image_dataset({"dataset": "coco+imagenet100", "root": roots})
    # JPEG may shift a flat grey level by one: COCO's 100, 150, 200, then the listed ImageNet-100 classes n02, n01
    assert [round(data[i].getpixel((4, 4))[0], -1) for i in range(len(data))] == [100, 150, 200, 60, 10]
    with pytest.raises(ValueError, match=r"coco\+imagenet100.*list of 2 roots"):
        build_image_dataset({"dataset": "coco+imagenet100", "root": str(tmp_path / "coco")})
    with pytest.raises(FileNotFoundError, match="ImageNet training images not found"):
        build_image_dataset({"dataset": "coco+imagenet", "root": [roots[0], str(tmp_path / "nowhere")]})


def test_hummingbird_memory_from_a_reference_file_set(tmp_path):
    from PIL import Image

    from funai_common.datasets import VOCSegmentation

    root = tmp_path / "VOCSegmentation"
    (root / "sets").mkdir(parents=True)
    (root / "sets" / "trainaug.txt").write_text("a\nb\nc\nd\n")
    for name in "abcd":
        for path, mode in (
            (root / "images" / f"{name}.jpg", "RGB"),
            (root / "SegmentationClassAug" / f"{name}.png", "L"),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new(mode, (8, 8)).save(path)
    (tmp_path / "fs.txt").write_text("d\nb\n")
    data = VOCSegmentation(root, "trainaug")
    chosen = hummingbird_memory_images(data, {"train_fraction": 1.0, "train_file_set": str(tmp_path / "fs.txt")})
    assert [p.stem for p, _ in chosen.pairs] == ["b", "d"]  # the listed images, in the dataset's order
    assert hummingbird_memory_images(data, {"train_fraction": 1.0, "train_file_set": None}) is data
    assert len(hummingbird_memory_images(data, {"train_fraction": 0.5, "train_file_set": None})) == 2
    with pytest.raises(ValueError, match=r"train_file_set='.*fs.txt' and hummingbird.train_fraction=0.5: .*not both"):
        hummingbird_memory_images(data, {"train_fraction": 0.5, "train_file_set": str(tmp_path / "fs.txt")})
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        hummingbird_memory_images(data, {"train_fraction": 1.0, "train_file_set": str(tmp_path / "missing.txt")})


def test_each_sample_and_epoch_gets_its_own_crops():
    images = _Images(n=4)
    ds = MultiCropDataset(images, global_size=28, local_size=14, seed=3)
    boxes = [ds[(0, i)][1] for i in range(4)]  # equal-sized images: only the seed can tell them apart
    assert all(not torch.equal(boxes[i], boxes[j]) for i in range(4) for j in range(i))
    assert not torch.equal(MultiCropDataset(images, global_size=28, local_size=14, seed=4)[(0, 0)][1], boxes[0])


def test_step_batch_sampler_reshuffles_every_epoch():
    it = iter(StepBatchSampler(12, 4, seed=1))
    epochs = [[i for _ in range(3) for _, i in next(it)] for _ in range(3)]
    assert all(sorted(order) == list(range(12)) for order in epochs)  # each epoch visits every sample once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
