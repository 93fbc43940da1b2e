import numpy as np
import pytest
from PIL import Image

from funai_common.datasets import (
    ADE20K,
    Cityscapes,
    COCOStuff,
    COCOThings,
    ImageDirectory,
    ImageFolderDataset,
    SyntheticClassification,
    SyntheticSegmentation,
    VOCSegmentation,
    build_segmentation_dataset,
    subset,
)


def _save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def _image(path):
    _save(path, np.full((8, 8, 3), 100), "RGB")


def test_voc_layout(tmp_path):
    root = tmp_path / "VOCSegmentation"
    (root / "sets").mkdir(parents=True)
    (root / "sets" / "val.txt").write_text("a\nb\n")
    (root / "sets" / "trainaug.txt").write_text("a\n")
    (root / "sets" / "train.txt").write_text("a\n")
    for name in "ab":
        _image(root / "images" / f"{name}.jpg")
        _save(root / "SegmentationClass" / f"{name}.png", np.full((8, 8), 255), "L")
    _save(root / "SegmentationClassAug" / "a.png", np.full((8, 8), 3), "L")
    val = VOCSegmentation(root, "val")
    image, mask = val[1]
    assert len(val) == 2 and image.size == (8, 8) and np.array(mask).max() == 255
    assert np.array(VOCSegmentation(root, "trainaug")[0][1]).max() == 3
    assert np.array(VOCSegmentation(root, "train")[0][1]).max() == 3  # train masks also from SegmentationClassAug
    assert val.num_classes == 21 and val.ignore_index == 255


def test_missing_paths_name_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOCSegmentation/.*sets"):
        VOCSegmentation(tmp_path / "nowhere")
    (tmp_path / "voc").mkdir()
    with pytest.raises(FileNotFoundError, match=r"sets/val.txt"):
        VOCSegmentation(tmp_path / "voc")
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        ADE20K(tmp_path / "ade")
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        build_segmentation_dataset("cityscapes", tmp_path / "cs")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_segmentation_dataset("kitti", tmp_path)
    with pytest.raises(FileNotFoundError, match="class name"):
        ImageFolderDataset(tmp_path / "imagenet")


def test_missing_files_and_colour_masks_are_reported_up_front(tmp_path):
    root = tmp_path / "VOCSegmentation"
    (root / "sets").mkdir(parents=True)
    (root / "sets" / "val.txt").write_text("a\nb\n")
    for name in "ab":
        _image(root / "images" / f"{name}.jpg")
    _save(root / "SegmentationClass" / "a.png", np.zeros((8, 8, 3)), "RGB")  # colour-coded, b.png missing
    with pytest.raises(FileNotFoundError, match=r"1 image/mask files of 2 pairs are missing, e.g. .*b\.png"):
        VOCSegmentation(root, "val")
    (root / "sets" / "val.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"a\.png has shape \(8, 8, 3\): expected a single-channel PNG"):
        VOCSegmentation(root, "val")[0]
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no image/mask pairs found in .*images/validation/\*\.jpg"):
        ADE20K(root, "val")


def test_corrupt_images_are_value_errors_naming_the_file(tmp_path):
    # garbage bytes and a truncated PNG under an image name: reported by path, not as PIL's error in a data loader
    _image(tmp_path / "train" / "cat" / "0.png")
    (tmp_path / "train" / "cat" / "1.jpg").write_bytes(b"not an image")
    whole = (tmp_path / "train" / "cat" / "0.png").read_bytes()
    (tmp_path / "train" / "cat" / "2.png").write_bytes(whole[: len(whole) // 2])
    folder, directory = ImageFolderDataset(tmp_path / "train"), ImageDirectory(tmp_path / "train")
    assert folder[0][0].size == (8, 8) and directory[0].size == (8, 8)
    for name, index in (("1.jpg", 1), ("2.png", 2)):
        for dataset in (folder, directory):
            with pytest.raises(ValueError, match=rf"{name} is not a readable image \(.*\); remove or replace"):
                dataset[index]
    root = tmp_path / "VOCSegmentation"
    (root / "sets").mkdir(parents=True)
    (root / "sets" / "val.txt").write_text("a\n")
    _image(root / "images" / "a.jpg")
    (root / "SegmentationClass").mkdir()
    (root / "SegmentationClass" / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"SegmentationClass/a\.png is not a readable image"):
        VOCSegmentation(root, "val")[0]


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    _image(tmp_path / "leftImg8bit" / "val" / "bonn" / "x_leftImg8bit.png")
    raw = np.array([[7, 8, 33, 0], [26, 1, 255, 24]] * 4)[:8, :4].repeat(2, axis=1)
    _save(tmp_path / "gtFine" / "val" / "bonn" / "x_gtFine_labelIds.png", raw, "L")
    mask = np.array(Cityscapes(tmp_path, "val")[0][1])
    # road(7)->0, sidewalk(8)->1, bicycle(33)->18, car(26)->13, person(24)->11, others -> 255
    assert mask[0, :8].tolist() == [0, 0, 1, 1, 18, 18, 255, 255]
    assert mask[1, :8].tolist() == [13, 13, 255, 255, 255, 255, 11, 11]


def test_coco_supercategories(tmp_path):
    _image(tmp_path / "images" / "val2017" / "1.jpg")
    _save(
        tmp_path / "annotations" / "stuff_annotations" / "stuff_val2017_pixelmaps" / "1.png",
        np.array([[92, 0, 183, 106]] * 2),
        "L",
    )
    stuff = COCOStuff(tmp_path, "val")
    # 92 = banner (textile), 0 = things, 183 = other, 106 = clouds (sky).
    assert stuff.num_classes == 15 and len(stuff.class_names) == 15
    mask = np.array(stuff[0][1])
    assert stuff.class_names[mask[0, 0]] == "textile"
    assert mask[0, 1] == 255 and mask[0, 2] == 255  # things and "other" are ignored
    assert stuff.class_names[mask[0, 3]] == "sky"  # clouds (106)
    _save(tmp_path / "annotations" / "val2017" / "1.png", np.array([[1, 3, 0, 200]] * 2), "L")
    things = COCOThings(tmp_path, "val")
    mask = np.array(things[0][1])
    assert [things.class_names[v] for v in mask[0, :2]] == ["person", "vehicle"]
    assert mask[0, 2] == 255 and mask[0, 3] == 255 and len(things.class_names) == 12


def test_image_folders(tmp_path):
    for cls in ("cat", "dog"):
        _image(tmp_path / "train" / cls / "0.png")
    ds = ImageFolderDataset(tmp_path / "train")
    assert [label for _, label in ds] == [0, 1] and ds.classes == ["cat", "dog"]
    assert len(ImageDirectory(tmp_path)) == 2
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageDirectory(tmp_path / "train" / "cat", extensions=(".jpg",))


def test_image_directory_follows_symlinked_folders_as_image_folder_does(tmp_path):
    # a tree of links to class folders (an ImageNet-100 subset, a COCO mirror): torchvision's ImageFolder (os.walk
    # with followlinks=True) finds the images below a linked folder, so the unlabelled loader must too
    _image(tmp_path / "store" / "n01" / "a.JPEG")
    _image(tmp_path / "store" / "b.jpg")
    (tmp_path / "tree" / "plain").mkdir(parents=True)
    _image(tmp_path / "tree" / "plain" / "c.png")
    (tmp_path / "tree" / "n01").symlink_to(tmp_path / "store" / "n01", target_is_directory=True)
    (tmp_path / "tree" / "b.jpg").symlink_to(tmp_path / "store" / "b.jpg")
    found = ImageDirectory(tmp_path / "tree").paths
    assert [p.relative_to(tmp_path / "tree").as_posix() for p in found] == ["b.jpg", "n01/a.JPEG", "plain/c.png"]
    (tmp_path / "labelled" / "x").mkdir(parents=True)
    (tmp_path / "labelled" / "x" / "n01").symlink_to(tmp_path / "store" / "n01", target_is_directory=True)
    assert len(ImageFolderDataset(tmp_path / "labelled")) == 1  # the labelled loader already follows links


def test_synthetic_classification_labels_follow_the_dominant_class():
    seg = SyntheticSegmentation(num_images=5, image_size=32, num_classes=4, seed=3, cell=8)
    cls = SyntheticClassification(seg)
    for i in range(5):
        mask = np.array(seg[i][1])
        counts = np.bincount(mask.reshape(-1), minlength=4)[1:]
        assert cls[i][1] == counts.argmax()


def test_image_folder_with_given_classes_keeps_their_numbering(tmp_path):
    for c in "ac":
        _image(tmp_path / "val" / c / "0.jpg")
    val = ImageFolderDataset(tmp_path / "val", classes=["a", "b", "c"])
    assert val.targets == [0, 2] and val.classes == ["a", "b", "c"]  # without classes: [0, 1]
    assert ImageFolderDataset(tmp_path / "val").targets == [0, 1]
    with pytest.raises(ValueError, match=r"class folders \['c'\] that are not among the given classes"):
        ImageFolderDataset(tmp_path / "val", classes=["a", "b"])


def _voc(tmp_path, names):
    """A VOC trainaug split of ``names`` whose i-th mask is filled with i."""
    root = tmp_path / "VOCSegmentation"
    (root / "sets").mkdir(parents=True, exist_ok=True)
    (root / "sets" / "trainaug.txt").write_text("".join(f"{n}\n" for n in names))
    for i, name in enumerate(names):
        _image(root / "images" / f"{name}.jpg")
        _save(root / "SegmentationClassAug" / f"{name}.png", np.full((8, 8), i), "L")
    return root


def test_file_sets_select_the_listed_images_in_dataset_order(tmp_path):
    root = _voc(tmp_path, ["e", "a", "d", "b", "c"])
    full = VOCSegmentation(root, "trainaug")
    (tmp_path / "fs.txt").write_text("c\n\n a \nc\n")  # blank line, spaces and a duplicate
    part = subset(full, tmp_path / "fs.txt")
    assert [img.stem for img, _ in part.pairs] == ["a", "c"]  # order of sets/trainaug.txt, not of the file set
    assert [int(np.array(part[i][1])[0, 0]) for i in range(2)] == [1, 4]  # their own masks
    assert len(full) == 5 and part.num_classes == 21  # the original is untouched
    assert [img.stem for img, _ in subset(full, ["b.jpg", "e"]).pairs] == ["e", "b"]
    with pytest.raises(
        FileNotFoundError, match=r"2 ids of the file set are not images of the dataset, e.g. \['x', 'y'\]"
    ):
        subset(full, ["a", "y", "x"])
    (tmp_path / "other.txt").write_text("a\nz\n")  # e.g. a trainaug file set used with the val split
    with pytest.raises(FileNotFoundError, match=r"e.g. \['z'\] \(file set .*other.txt; the dataset split holds 5 "):
        subset(full, tmp_path / "other.txt")
    with pytest.raises(FileNotFoundError, match="file set .*nope.txt not found"):
        subset(full, tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n")  # an empty file set is an error, not an empty memory
    with pytest.raises(ValueError, match=r"lists no image ids \(file set .*empty.txt;"):
        subset(full, tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="lists no image ids"):
        subset(full, [])
    with pytest.raises(ValueError, match="no image files"):
        subset(SyntheticSegmentation(num_images=2, image_size=16, num_classes=2), ["a"])


def test_cityscapes_file_sets_list_base_names(tmp_path):
    for name in ("x", "y"):
        _image(tmp_path / "leftImg8bit" / "val" / "bonn" / f"bonn_{name}_leftImg8bit.png")
        _save(tmp_path / "gtFine" / "val" / "bonn" / f"bonn_{name}_gtFine_labelIds.png", np.zeros((8, 8)), "L")
    part = subset(Cityscapes(tmp_path, "val"), ["bonn_y"])  # the reference's ids drop "_leftImg8bit.png"
    assert [img.name for img, _ in part.pairs] == ["bonn_y_leftImg8bit.png"]


def test_fraction_keeps_a_seeded_share_in_dataset_order(tmp_path):
    names = [f"{i:02d}" for i in range(10)]
    full = VOCSegmentation(_voc(tmp_path, names), "trainaug")
    picks = {}
    for seed in range(6):
        kept = [img.stem for img, _ in subset(full, fraction=0.35, seed=seed).pairs]
        assert len(kept) == 3 and kept == sorted(kept) and set(kept) <= set(names)  # int(10 * 0.35)
        assert kept == [img.stem for img, _ in subset(full, fraction=0.35, seed=seed).pairs]
        picks[seed] = tuple(kept)
    assert len(set(picks.values())) > 1  # the seed matters
    assert [img.stem for img, _ in subset(full, fraction=1.0).pairs] == names
    # a file set first, then the fraction of it
    kept = [img.stem for img, _ in subset(full, ["01", "03", "05", "07"], fraction=0.5).pairs]
    assert len(kept) == 2 and set(kept) <= {"01", "03", "05", "07"}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            subset(full, fraction=bad)
    with pytest.raises(ValueError, match="keeps none"):
        subset(full, fraction=0.05)
