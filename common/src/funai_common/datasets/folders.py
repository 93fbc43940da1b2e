"""Image-folder datasets: ImageNet-style labelled folders and unlabelled image directories (e.g. COCO train2017)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from funai_common.datasets.segmentation import require

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderDataset(ImageFolder):
    """``<root>/<class>/<image>`` (ImageNet train/val once val is sorted into class folders): (image, label)."""

    def __init__(self, root, transform=None):
        path = require(Path(root), "<root>/<class name>/<image>.{jpg,png,...}")
        if not any(p.is_dir() for p in path.iterdir()):
            raise FileNotFoundError(f"{path} has no class sub-folders (layout: <root>/<class name>/<image>)")
        super().__init__(str(path), transform=transform)


class ImageDirectory(Dataset):
    """Every image below ``root`` (recursive, sorted), unlabelled: yields the (transformed) image only."""

    def __init__(self, root, transform=None, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        root = require(Path(root), "a folder of images, e.g. coco/images/train2017/*.jpg")
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions)
        if not self.paths:
            raise FileNotFoundError(f"no images with extensions {extensions} found below {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = Image.open(self.paths[i]).convert("RGB")
        return self.transform(image) if self.transform else image
