"""Object pools (cut-out sources with masks and cluster ids) and background pools for the self-collage sampler."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from funai_common.datasets import open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG")


def load_rgb(path: str | Path) -> torch.Tensor:
    """(3, H, W) float tensor in [0, 1] of an image file; ValueError naming a file that is not a readable image."""
    array = np.asarray(open_image(path), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def list_images(root: str | Path) -> list[Path]:
    """Image files below ``root`` (recursive, sorted); FileNotFoundError if ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.suffix in IMAGE_EXTENSIONS or p.suffix.lower() in IMAGE_EXTENSIONS)


class TensorObjectPool:
    """In-memory object pool: images (3, H, W) in [0, 1], boolean masks (H, W) and one cluster id per object."""

    def __init__(self, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], cluster_ids: Sequence[int]):
        if not (len(images) == len(masks) == len(cluster_ids)):
            raise ValueError(
                f"images/masks/cluster_ids lengths differ: {len(images)}, {len(masks)}, {len(cluster_ids)}"
            )
        self.images, self.masks = list(images), [m.bool() for m in masks]
        self.cluster_ids = np.asarray(cluster_ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (3, H, W), boolean mask (H, W)) of object ``index``."""
        return self.images[index], self.masks[index]


class FileObjectPool:
    """Object pool from preprocessed files: an image list, mask shards and a cluster file (``counting-preprocess``).

    ``masks_dir`` holds ``index.json`` (the image list relative to ``image_root``, mask size, method) and shards
    ``masks_<start>_<stop>.safetensors`` with a uint8 tensor ``masks`` (n, s, s); ``clusters`` is a safetensors file
    with ``assignments`` (N,) (and ``centroids``), written by the k-means step.
    """

    def __init__(self, image_root: str | Path, masks_dir: str | Path, clusters: str | Path):
        self.image_root, masks_dir = Path(image_root), Path(masks_dir)
        index_file = masks_dir / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: run `counting-preprocess masks` first")
        if not Path(clusters).is_file():
            raise FileNotFoundError(f"cluster file {clusters} not found: run `counting-preprocess clusters` first")
        index = json.loads(index_file.read_text())
        self.paths = [self.image_root / p for p in index["images"]]
        self.shard_size = index["shard_size"]
        self.masks_dir = masks_dir
        self.cluster_ids = load_file(str(clusters))["assignments"].numpy().astype(np.int64)
        if len(self.cluster_ids) != len(self.paths):
            raise ValueError(f"{clusters} has {len(self.cluster_ids)} assignments for {len(self.paths)} images")
        self._shards: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _mask(self, index: int) -> torch.Tensor:
        # shards are memory-mapped and sliced lazily: the full ImageNet mask set (~64 GB at 224 px) never sits in RAM
        shard = index // self.shard_size
        if shard not in self._shards:
            start = shard * self.shard_size
            stop = min(start + self.shard_size, len(self.paths))
            file = self.masks_dir / f"masks_{start:08d}_{stop:08d}.safetensors"
            if not file.is_file():
                raise FileNotFoundError(f"mask shard {file} missing: rerun `counting-preprocess masks`")
            self._shards[shard] = safe_open(str(file), framework="pt").get_slice("masks")
        offset = index - shard * self.shard_size
        return self._shards[shard][offset : offset + 1][0].bool()

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (3, H, W) in [0, 1] read from its file, boolean mask (s, s) from its shard) of object ``index``."""
        return load_rgb(self.paths[index]), self._mask(index)


class TensorBackgroundPool:
    """In-memory backgrounds (3, H, W) in [0, 1]."""

    def __init__(self, images: Sequence[torch.Tensor]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> torch.Tensor:
        """Background ``index``: (3, H, W) in [0, 1]."""
        return self.images[index]


class FileBackgroundPool:
    """Backgrounds from image files: SUN397 (``<root>/SUN397/a/abbey/*.jpg``) or any folder of images."""

    def __init__(self, root: str | Path, paths: Sequence[str | Path] | None = None):
        self.paths = [Path(p) for p in paths] if paths is not None else list_images(root)
        if not self.paths:
            raise FileNotFoundError(f"no background images under {root}")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """Background ``index`` read from its file: (3, H, W) float in [0, 1]."""
        return load_rgb(self.paths[index])


def sun397_backgrounds(root: str | Path, split: str = "train", partition: int = 1) -> FileBackgroundPool:
    """SUN397 backgrounds: ``<root>/SUN397/<letter>/<class>/*.jpg`` and ``<root>/Partitions/Testing_01.txt``.

    As the reference (``CustomSUN397``): the test split is the images listed in ``Testing_<partition:02d>.txt``,
    the train split every other image under SUN397/ (not ``Training_<partition>.txt``, which lists only 50 images
    per class). Without that list every image under SUN397/ is used.
    """
    root = Path(root)
    images = root / "SUN397"
    if not images.is_dir():
        raise FileNotFoundError(f"SUN397 images not found at {images} (expected <root>/SUN397/a/abbey/*.jpg)")
    listing = root / "Partitions" / f"Testing_{partition:02d}.txt"
    if not listing.is_file():
        return FileBackgroundPool(images)
    test = [images / line.strip().lstrip("/") for line in listing.read_text().splitlines() if line.strip()]
    if split != "train":
        return FileBackgroundPool(images, test)
    held_out = set(test)
    return FileBackgroundPool(images, [p for p in list_images(images) if p not in held_out])
