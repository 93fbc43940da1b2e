from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fungi.data import build_split, label_ids, read_table, torchvision_dataset, validation_split, wave_to_float


def test_tsv_quotes_are_plain_characters(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('text\tlabel\n"hello world, he said\t1\nit\'s "fine" ok\t0\n')
    assert read_table(path) == [('"hello world, he said', "1"), ('it\'s "fine" ok', "0")]


def test_torchvision_dataset_kinds(tmp_path):
    with pytest.raises(ValueError, match="'EuroSAT' has no train/test split.*imagefolder"):
        torchvision_dataset("EuroSAT", str(tmp_path), "train")
    with pytest.raises(ValueError, match="no dataset 'NotADataset'"):
        torchvision_dataset("NotADataset", str(tmp_path), "train")


def test_tsv_glue_header_with_label_second_column(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tLabel\nit is good\t1\nbad\t0\n")
    assert read_table(path) == [("it is good", "1"), ("bad", "0")]


def test_missing_torchvision_dataset_is_file_not_found(tmp_path):
    for name in ("DTD", "Flowers102", "CIFAR10"):
        expected = f"{name} not found .or incomplete. under data.root='{tmp_path}'.*never downloads"
        with pytest.raises(FileNotFoundError, match=expected):
            torchvision_dataset(name, str(tmp_path), "test")


def make_folders(root, split, classes):
    for c in classes:
        (root / split / c).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / split / c / "0.png")


def test_imagefolder_test_split_uses_train_class_indices(tmp_path):
    make_folders(tmp_path, "train", "abc")
    make_folders(tmp_path, "val", "ac")
    data = {"kind": "imagefolder", "root": str(tmp_path), "train_split": "train", "test_split": "val"}
    assert build_split(data, "train").targets == [0, 1, 2]
    val = build_split(data, "test")
    assert [(Path(p).parent.name, y) for p, y in val.samples] == [("a", 0), ("c", 2)]
    assert val.targets == [0, 2] and val[1][1] == 2 and val.class_to_idx == {"a": 0, "b": 1, "c": 2}
    make_folders(tmp_path, "extra", "ad")
    with pytest.raises(ValueError, match=r"extra vs train split .*train: .*extra has class folders \[.d.\] that"):
        build_split({**data, "test_split": "extra"}, "test")


def test_unknown_split_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown split 'valid'.*\['train', 'val', 'test'\]"):
        build_split({"kind": "digits", "image_size": 8}, "valid")
    with pytest.raises(ValueError, match=r"split 'val' requested but the dataset \(data.kind=digits\) has no valid"):
        build_split({"kind": "digits", "image_size": 8}, "val")


def test_validation_split_resolution(tmp_path):
    """'auto': torchvision DTD / Flowers102 / FGVCAircraft read split='val' (as the reference's VALID split), the
    other torchvision datasets and non-image kinds have none; an ImageFolder has one when a 'val' folder exists that
    is neither the train nor the test folder."""
    tv = {"kind": "torchvision", "root": str(tmp_path), "train_split": "train", "test_split": "test"}
    assert [validation_split({**tv, "name": n}) for n in ("DTD", "Flowers102", "FGVCAircraft")] == ["val"] * 3
    assert validation_split({**tv, "name": "CIFAR10"}) is None and validation_split({**tv, "name": "Food101"}) is None
    # the default test_split is 'val': reading it again as validation would choose lambda on the test images
    for name in ("DTD", "Flowers102", "FGVCAircraft"):
        assert validation_split({**tv, "name": name, "test_split": "val", "val_split": "auto"}) is None
        assert validation_split({**tv, "name": name, "train_split": "val", "val_split": "auto"}) is None
    assert validation_split({"kind": "digits"}) is None and validation_split({"kind": "text"}) is None
    folders = {"kind": "imagefolder", "root": str(tmp_path), "train_split": "train", "test_split": "test"}
    assert validation_split(folders) is None  # no val folder
    make_folders(tmp_path, "train", "abc")
    make_folders(tmp_path, "val", "cb")
    assert validation_split(folders) == "val"
    assert validation_split({**folders, "test_split": "val"}) is None  # the default layout: val is the test folder
    assert validation_split({**folders, "val_split": None}) is None
    val = build_split(folders, "val")  # labelled with the train folder's class indices
    assert [(Path(p).parent.name, y) for p, y in val.samples] == [("b", 1), ("c", 2)]
    assert validation_split({**folders, "val_split": "holdout"}) == "holdout"
    with pytest.raises(ValueError, match="'val' is also the train or test split"):
        validation_split({**folders, "test_split": "val", "val_split": "val"})
    with pytest.raises(ValueError, match="only read for data.kind=imagefolder or torchvision, not 'text'"):
        validation_split({"kind": "text", "val_split": "dev"})
    with pytest.raises(ValueError, match="'CIFAR10' takes no split= argument"):
        validation_split({**tv, "name": "CIFAR10", "val_split": "val"})


def test_wave_to_float_scales_by_dtype_range():
    quiet = np.array([-2, 0, 16384], dtype=np.int16)  # peak far below 1.0 after scaling: still divided by 32768
    assert wave_to_float(quiet).tolist() == [-2 / 32768, 0.0, 0.5]
    assert wave_to_float(np.array([-32768, 32767], dtype=np.int16)).tolist() == [-1.0, np.float32(32767 / 32768)]
    assert wave_to_float(np.array([2**30, -(2**31), 3], dtype=np.int32)).tolist() == [0.5, -1.0, np.float32(3 / 2**31)]
    assert wave_to_float(np.array([0, 128, 192], dtype=np.uint8)).tolist() == [-1.0, 0.0, 0.5]
    floats = np.array([0.25, -2.0], dtype=np.float32)
    assert wave_to_float(floats).tolist() == [0.25, -2.0]
    stereo = np.array([[16384, -16384]], dtype=np.int16)
    assert wave_to_float(stereo).tolist() == [[0.5, -0.5]]


def test_label_ids_number_integer_labels_by_value_and_words_alphabetically():
    assert label_ids(["10", "2", "-1", "2", "0"]) == ([3, 2, 0, 2, 1], ["-1", "0", "2", "10"])
    assert label_ids(["neg", "pos", "neg", "mixed"]) == ([1, 2, 1, 0], ["mixed", "neg", "pos"])
    assert label_ids(["b"], ["c", "b"]) == ([1], ["c", "b"])
    with pytest.raises(ValueError, match="not in the training classes"):
        label_ids(["d"], ["c", "b"])


def test_text_test_split_uses_the_training_class_ids(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\na\tcat\nb\tdog\nc\temu\n")
    (tmp_path / "test.tsv").write_text("text\tlabel\nd\temu\ne\tcat\n")  # no dog: emu is still class 2
    data = {"kind": "text", "train_file": str(tmp_path / "train.tsv"), "test_file": str(tmp_path / "test.tsv")}
    train, test = build_split(data, "train"), build_split(data, "test")
    assert [train[i][1] for i in range(3)] == [0, 1, 2]
    assert [test[i] for i in range(2)] == [("d", 2), ("e", 0)]
