"""Dataset loaders: segmentation benchmarks, image folders and a synthetic segmentation set."""

from __future__ import annotations

from funai_common.datasets.folders import ImageDirectory, ImageFolderDataset
from funai_common.datasets.segmentation import (
    ADE20K,
    Cityscapes,
    COCOStuff,
    COCOThings,
    SegmentationDataset,
    VOCSegmentation,
    open_image,
    read_file_set,
    subset,
)
from funai_common.datasets.synthetic import SyntheticClassification, SyntheticSegmentation

SEGMENTATION_DATASETS = {
    "voc": VOCSegmentation,
    "ade20k": ADE20K,
    "coco-things": COCOThings,
    "coco-stuff": COCOStuff,
    "cityscapes": Cityscapes,
}


def build_segmentation_dataset(name: str, root=None, split: str = "val", **kwargs):
    """A segmentation dataset by name: voc, ade20k, coco-things, coco-stuff, cityscapes or synthetic.

    "synthetic" ignores ``root``; its split "train" and "val" use different seeds.
    """
    if name == "synthetic":
        kwargs.setdefault("seed", 0 if split == "train" else 1)
        return SyntheticSegmentation(**kwargs)
    if name not in SEGMENTATION_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(SEGMENTATION_DATASETS) + ['synthetic']}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (layout: {SEGMENTATION_DATASETS[name].layout})")
    return SEGMENTATION_DATASETS[name](root, split=split, **kwargs)


__all__ = [
    "ADE20K",
    "COCOStuff",
    "COCOThings",
    "Cityscapes",
    "ImageDirectory",
    "ImageFolderDataset",
    "SEGMENTATION_DATASETS",
    "SegmentationDataset",
    "SyntheticClassification",
    "SyntheticSegmentation",
    "VOCSegmentation",
    "build_segmentation_dataset",
    "open_image",
    "read_file_set",
    "subset",
]
