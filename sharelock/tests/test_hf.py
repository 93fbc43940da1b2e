"""Hugging Face datasets as evaluation sources (`hf:<name>[:<split>]`): rows, labels and class names in order,
offline, and errors naming the bad dataset, split or column. Skipped without the optional `datasets` package."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

datasets = pytest.importorskip("datasets")

from sharelock import precompute  # noqa: E402
from sharelock.data import LabelledImages, eval_transform, load_class_names, load_hf_split, parse_hf_spec  # noqa: E402
from sharelock.features import build_vision_encoder  # noqa: E402
from sharelock.store import FeatureStore  # noqa: E402
from sharelock.tiny import tiny_vit_spec  # noqa: E402

NAMES = ["tench, Tinca tinca", "goldfish", "great white shark"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """As on a machine without network (HF_DATASETS_OFFLINE=1), with a private datasets cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Small random images of different sizes; every third one greyscale (converted to RGB on reading)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = 20 + 3 * i, 30 - 2 * i
        pixels = rng.integers(0, 256, (h, w) if i % 3 == 2 else (h, w, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def save_tiny_dataset(root, labels=(2, 0, 1, 1, 0)):
    """A `save_to_disk` DatasetDict with train/validation splits, an image, a ClassLabel and a string column."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES), "note": datasets.Value("string")}
    )
    images = random_images(len(labels))
    val = datasets.Dataset.from_dict(
        {"image": images, "label": list(labels), "note": [f"row {i}" for i in range(len(labels))]}, features=features
    )
    train = datasets.Dataset.from_dict(
        {"image": random_images(2, seed=1), "label": [1, 1], "note": ["a", "b"]}, features=features
    )
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(root))
    return images, list(labels)


def test_saved_dataset_rows_labels_and_class_names_in_order(tmp_path):
    images, labels = save_tiny_dataset(tmp_path / "ds")
    spec = f"hf:{tmp_path / 'ds'}:validation"
    data = LabelledImages(spec)
    assert len(data) == 5 and data.classes == NAMES  # raw ClassLabel names, as folder names are for ImageFolder
    transform = eval_transform()
    for i in range(5):
        key, image, label = data[i]
        assert key == str(i) and label == labels[i]
        torch.testing.assert_close(image, transform(images[i].convert("RGB")), rtol=0, atol=0)
    # without a split in the spec, the split argument (split= / source.split=) chooses it
    assert [LabelledImages(f"hf:{tmp_path / 'ds'}", split="train")[i][2] for i in range(2)] == [1, 1]
    assert [LabelledImages(f"hf:{tmp_path / 'ds'}", split="validation")[i][2] for i in range(5)] == labels
    # class names from features["label"].names, first synonym kept as in the reference; any split
    assert load_class_names(spec) == ["tench", "goldfish", "great white shark"]
    assert load_class_names(f"hf:{tmp_path / 'ds'}") == ["tench", "goldfish", "great white shark"]
    # labels that index the same names in another order (sorted class folders): the names follow the labels
    assert load_class_names(spec, sorted(NAMES)) == ["goldfish", "great white shark", "tench"]
    with pytest.raises(ValueError, match="3 class names but the dataset has 2 class folders"):
        load_class_names(spec, NAMES[:2])
    # a single saved Dataset (no splits) and other column names
    renamed = load_hf_split(spec).rename_columns({"image": "img", "label": "fine_label"})
    renamed.save_to_disk(str(tmp_path / "single"))
    single = LabelledImages(f"hf:{tmp_path / 'single'}", image_column="img", label_column="fine_label")
    assert single.classes == NAMES and [single[i][2] for i in range(5)] == labels
    torch.testing.assert_close(single[3][1], data[3][1], rtol=0, atol=0)


def test_image_folder_through_load_dataset_matches_torchvision_image_folder(tmp_path):
    """`hf:<folder>[:<split>]` is `load_dataset(<folder>)`: the imagefolder builder, offline, labels from folders."""
    images = random_images(6, seed=2)
    for split in ("train", "test"):
        for i, image in enumerate(images):
            folder = tmp_path / "folder" / split / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:03d}.png")  # lossless
    hf = LabelledImages(f"hf:{tmp_path / 'folder'}:test")
    tv = LabelledImages(tmp_path / "folder" / "test", "imagefolder")
    assert hf.classes == tv.classes == ["cat", "dog"]
    assert load_class_names(f"hf:{tmp_path / 'folder'}:test") == ["cat", "dog"]
    hf_rows = sorted((label, image.flatten().tolist()) for _, image, label in (hf[i] for i in range(len(hf))))
    tv_rows = sorted((label, image.flatten().tolist()) for _, image, label in (tv[i] for i in range(len(tv))))
    assert len(hf_rows) == 6 and hf_rows == tv_rows
    with pytest.raises(ValueError, match="split 'validation' not in Hugging Face dataset"):
        LabelledImages(f"hf:{tmp_path / 'folder'}:validation")


def test_features_cli_reads_a_hf_dataset_and_records_its_class_names(tmp_path):
    images, labels = save_tiny_dataset(tmp_path / "ds")
    torch.manual_seed(0)
    spec = tiny_vit_spec(img_size=224)
    vit = build_vision_encoder(spec)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    args = ["modality=image", "source.type=labelled", f"source.path=hf:{tmp_path / 'ds'}", "source.split=validation"]
    args += [f"out={tmp_path / 'store'}", f"vision.model={spec['model']}", "vision.pretrained=false"]
    args += [f"vision.checkpoint={tmp_path / 'vit.safetensors'}", f"vision.kwargs={json.dumps(spec['kwargs'])}"]
    precompute.main([*args, "batch_size=2", "num_workers=0", "shard_size=3"])
    store = FeatureStore(tmp_path / "store")
    assert store.meta["source"]["classes"] == NAMES and store.meta["source"]["path"].startswith("hf:")
    order = [str(i) for i in range(5)]
    assert [int(store.labels[store.ids.index(k)]) for k in order] == labels
    expected = vit(torch.stack([eval_transform()(im.convert("RGB")) for im in images]))
    torch.testing.assert_close(store.get(order), expected, atol=1e-5, rtol=1e-5)


def test_errors_name_the_bad_dataset_split_or_column(tmp_path):
    save_tiny_dataset(tmp_path / "ds")
    ds = tmp_path / "ds"
    for bad in ("hf:", "hf::test", "hf:name:"):
        with pytest.raises(ValueError, match="expected hf:<name>"):
            parse_hf_spec(bad)
    assert parse_hf_spec("hf:ILSVRC/imagenet-1k:validation") == ("ILSVRC/imagenet-1k", "validation")
    assert parse_hf_spec("hf:cifar10") == ("cifar10", None)
    with pytest.raises(FileNotFoundError, match="Hugging Face dataset folder not found: .*no-such-set"):
        LabelledImages(f"hf:{tmp_path / 'no-such-set'}:test")
    with pytest.raises(ValueError, match=r"split 'test' not in Hugging Face dataset .*\['train', 'validation'\]"):
        LabelledImages(f"hf:{ds}:test")
    with pytest.raises(ValueError, match="no image column 'img' .*'image', 'label', 'note'"):
        LabelledImages(f"hf:{ds}:validation", image_column="img")
    with pytest.raises(ValueError, match="no label column 'fine_label'"):
        load_class_names(f"hf:{ds}:validation", label_column="fine_label")
    with pytest.raises(ValueError, match="column 'note' of Hugging Face dataset .* is not a ClassLabel"):
        load_class_names(f"hf:{ds}", label_column="note")
    # a Hub id that is not in the local cache, offline
    with pytest.raises(FileNotFoundError, match="'no-such-user/no-such-set' not found \\(offline"):
        load_hf_split("hf:no-such-user/no-such-set:test")
    # an unlabelled split (label -1, e.g. a competition test set)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    unlabelled = datasets.Dataset.from_dict({"image": random_images(2), "label": [0, -1]}, features=features)
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match="unlabelled rows"):
        LabelledImages(f"hf:{tmp_path / 'unlabelled'}")
    # the features CLI checks the dataset before loading a backbone, and creates no store
    store = tmp_path / "store"
    image = ["modality=image", "vision.model=no_such_vit", "vision.pretrained=false", f"out={store}"]
    with pytest.raises(ValueError, match="split 'val' not in"):  # the default split, named
        precompute.main([*image, "source.type=labelled", f"source.path=hf:{ds}"])
    text = ["modality=text", f"language.model={tmp_path / 'no-such-llm'}", f"out={store}", "source.type=classnames"]
    with pytest.raises(ValueError, match="no label column 'fine'"):
        precompute.main([*text, f"source.path=hf:{ds}", "source.label_column=fine"])
    assert not store.exists()


def test_hub_class_names_come_from_the_metadata_without_loading_the_data(monkeypatch):
    class Builder:
        info = datasets.DatasetInfo(
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
        )

    def no_download(*args, **kwargs):
        raise AssertionError("load_dataset was called for class names that the metadata holds")

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda name: Builder)
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    assert load_class_names("hf:someone/imagenet-like:validation") == ["tench", "goldfish", "great white shark"]
    with pytest.raises(ValueError, match="no label column 'fine_label'"):
        load_class_names("hf:someone/imagenet-like", label_column="fine_label")
