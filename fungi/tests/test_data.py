import pytest

from fungi.data import read_table, torchvision_dataset


def test_tsv_quotes_are_plain_characters(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('text\tlabel\n"hello world, he said\t1\nit\'s "fine" ok\t0\n')
    assert read_table(path) == [('"hello world, he said', "1"), ('it\'s "fine" ok', "0")]


def test_torchvision_dataset_kinds(tmp_path):
    with pytest.raises(ValueError, match="'EuroSAT' has no train/test split.*imagefolder"):
        torchvision_dataset("EuroSAT", str(tmp_path), "train")
    with pytest.raises(ValueError, match="no dataset 'NotADataset'"):
        torchvision_dataset("NotADataset", str(tmp_path), "train")
    # split= and train= datasets reach their own (missing files) check
    with pytest.raises(RuntimeError, match="not found|download"):
        torchvision_dataset("DTD", str(tmp_path), "train")
    with pytest.raises(RuntimeError, match="not found|download"):
        torchvision_dataset("CIFAR10", str(tmp_path), "test")
