"""Image-folder datasets: ImageNet-style labelled folders and unlabelled image directories (e.g. COCO train2017)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from funai_common.datasets.segmentation import open_image, require

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderDataset(ImageFolder):
    """``<root>/<class>/<image>`` (ImageNet train/val once val is sorted into class folders): (image, label).

    ``classes`` (e.g. the train split's) fixes the label numbering, so that a split lacking some class folders keeps
    the same labels; a class folder not in it is a ValueError. Default: the sorted class folders of ``root``.
    """

    def __init__(self, root, transform=None, classes: Sequence[str] | None = None):
        path = require(Path(root), "<root>/<class name>/<image>.{jpg,png,...}")
        if not any(p.is_dir() for p in path.iterdir()):
            raise FileNotFoundError(f"{path} has no class sub-folders (layout: <root>/<class name>/<image>)")
        self._given_classes = None if classes is None else list(classes)
        # a split may lack some of the given classes (allow_empty), never have others (find_classes)
        super().__init__(str(path), transform=transform, loader=open_image, allow_empty=classes is not None)

    def find_classes(self, directory):
        """(classes, class_to_idx): the given ``classes`` and their numbering if set, else the sorted class folders."""
        found, class_to_idx = super().find_classes(directory)
        if self._given_classes is None:
            return found, class_to_idx
        unknown = sorted(set(found) - set(self._given_classes))
        if unknown:
            raise ValueError(f"{directory} has class folders {unknown[:5]} that are not among the given classes")
        return self._given_classes, {c: i for i, c in enumerate(self._given_classes)}


class ImageDirectory(Dataset):
    """Every image below ``root`` (recursive, sorted; linked folders are followed), unlabelled: yields the
    (transformed) image only."""

    def __init__(self, root, transform=None, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        root = require(Path(root), "a folder of images, e.g. coco/images/train2017/*.jpg")
        # os.walk(followlinks=True) as torchvision's ImageFolder: Path.rglob skips linked folders before Python 3.13
        self.paths = sorted(
            Path(folder, name)
            for folder, _, names in os.walk(root, followlinks=True)
            for name in names
            if Path(name).suffix.lower() in extensions
        )
        if not self.paths:
            raise FileNotFoundError(f"no images with extensions {extensions} found below {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = open_image(self.paths[i])
        return self.transform(image) if self.transform else image
