"""NeCo training data: unlabelled images -> multi-crop views with overlap boxes (spec section 2).

Every sample's randomness comes from a seed derived from (seed, epoch, index), so a batch is identical whatever
the number of workers or processes, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import ConcatDataset, Dataset, Sampler
from torchvision import transforms as T

from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD
from neco.crops import sample_crop_boxes

DATASETS = ("coco", "imagenet", "imagenet100", "voc", "folder", "synthetic")


class RandomGaussianBlur:
    """PIL Gaussian blur with radius ~ U(sigma_min, sigma_max), applied with probability p (torch RNG)."""

    def __init__(self, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(())) >= self.p:
            return img
        radius = float(torch.empty(()).uniform_(*self.sigma))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def photometric_transform() -> T.Compose:
    """Per-crop colour augmentation of the reference (no flip: it would break box alignment)."""
    return T.Compose(
        [
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            RandomGaussianBlur(p=0.5),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Independent 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class MultiCropDataset(Dataset):
    """Wraps an image dataset; item ``(epoch, index)`` -> (list of C crop tensors, boxes (C, 4) xyxy pixels)."""

    def __init__(
        self,
        images: Dataset,
        global_size: int = 518,
        local_size: int = 98,
        num_global: int = 2,
        num_local: int = 4,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        min_intersection: float = 0.01,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.sizes = [global_size] * num_global + [local_size] * num_local
        self.num_global, self.num_local = num_global, num_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.min_intersection = min_intersection
        self.seed = seed
        self.photometric = photometric_transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[list[torch.Tensor], torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.images[index]
        if not isinstance(image, Image.Image):
            raise TypeError(f"training dataset must yield PIL images, got {type(image).__name__}")
        image = image.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            boxes = sample_crop_boxes(
                image.width,
                image.height,
                self.num_global,
                self.num_local,
                self.global_scale,
                self.local_scale,
                self.min_intersection,
            )
            crops = []
            for box, size in zip(boxes.tolist(), self.sizes):
                crop = image.resize((size, size), Image.BILINEAR, box=tuple(box))
                crops.append(self.photometric(crop))
        return crops, boxes


def collate_multicrop(batch: list[tuple[list[torch.Tensor], torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stack a list of samples into (C tensors (B, 3, s_c, s_c), boxes (B, C, 4))."""
    crops = [torch.stack([sample[0][c] for sample in batch]) for c in range(len(batch[0][0]))]
    return crops, torch.stack([sample[1] for sample in batch])


class StepBatchSampler(Sampler):
    """Yields this process's share of each global batch as (epoch, index) keys, from ``start_step`` on.

    Global batch ``s`` of epoch ``e`` is slice ``[s*G, (s+1)*G)`` of a permutation seeded by (seed, e); process
    ``rank`` takes its contiguous ``G / world`` part. The data position is thus a pure function of the step.
    """

    def __init__(
        self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0
    ) -> None:
        if global_batch % world:
            raise ValueError(f"optim.batch_size={global_batch} must be divisible by the {world} processes")
        self.iters_per_epoch = num_samples // global_batch
        if self.iters_per_epoch == 0:
            raise ValueError(f"dataset of {num_samples} images is smaller than optim.batch_size={global_batch}")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.world, self.start_step = rank, world, start_step
        self.local = global_batch // world

    def __len__(self) -> int:
        return 2**62

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            epoch, it = divmod(step, self.iters_per_epoch)
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            start = it * self.global_batch + self.rank * self.local
            yield [(epoch, int(i)) for i in order[start : start + self.local]]
            step += 1


class _ImagesOnly(Dataset):
    """Drops labels/masks from a dataset that returns tuples."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Image.Image:
        item = self.dataset[index]
        return item[0] if isinstance(item, tuple) else item


def _require(path: str, what: str, layout: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what} not found: expected the directory {os.path.abspath(path)!r} ({layout}). Set data.root=/path "
            f"(e.g. `make neco-train ARGS='data.root=/data/coco'`), or train on synthetic data with "
            f"`--config tiny` (ARGS='--config configs/tiny.yaml')."
        )


def imagenet100_classes(root: str) -> list[str]:
    """The class folders listed in ``<root>/imagenet100.txt`` (first word of each non-empty line, file order), as
    the reference's ``imagenet100k`` dataset reads them; each must exist below ``<root>/train``. Without the list, a
    ``<root>/train`` holding exactly 100 class folders (an already extracted subset) is taken whole, sorted."""
    listing = os.path.join(root, "imagenet100.txt")
    if not os.path.isfile(listing):
        train = os.path.join(root, "train")
        folders = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
        if len(folders) == 100:
            return folders
        raise FileNotFoundError(
            f"ImageNet-100 class list not found: expected the file {os.path.abspath(listing)!r} (one wnid per line, "
            f"next to <data.root>/train), since {train!r} holds {len(folders)} class folders, not 100; or use "
            f"data.dataset=imagenet for every class folder"
        )
    with open(listing) as f:
        classes = [line.split()[0] for line in f if line.strip()]
    if not classes:
        raise ValueError(f"ImageNet-100 class list {listing!r} is empty")
    absent = [c for c in classes if not os.path.isdir(os.path.join(root, "train", c))]
    if absent:
        raise ValueError(
            f"{len(absent)} classes of {listing!r} have no folder in {os.path.join(root, 'train')!r}: {absent[:5]}"
        )
    return classes


def build_image_dataset(cfg: dict[str, Any]) -> Dataset:
    """Unlabelled training images for ``cfg['dataset']`` in DATASETS rooted at ``cfg['root']``.

    Names joined by ``+`` (the reference's ``coco,imagenet100k``: ``coco+imagenet100``) concatenate those datasets in
    that order; ``cfg['root']`` is then a list with one root per name.
    """
    from funai_common import datasets as fds

    name, root = cfg["dataset"], cfg.get("root")
    if "+" in name:
        parts = name.split("+")
        if not isinstance(root, (list, tuple)) or len(root) != len(parts):
            raise ValueError(
                f"data.dataset={name!r} needs data.root as a list of {len(parts)} roots, one per dataset "
                f"(e.g. data.root=[/data/coco,/data/imagenet]), got {root!r}"
            )
        return ConcatDataset([build_image_dataset(dict(cfg, dataset=p, root=r)) for p, r in zip(parts, root)])
    if name in DATASETS and name != "synthetic" and not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"data.dataset={name!r} needs data.root=/path (a folder), got {root!r}")
    if name == "coco":
        path = os.path.join(root, "train2017")
        _require(path, "COCO train2017 images", "<data.root>/train2017/*.jpg")
        return fds.ImageDirectory(path)
    if name in ("imagenet", "imagenet100"):
        path = os.path.join(root, "train")
        _require(path, "ImageNet training images", "<data.root>/train/<wnid>/*.JPEG")
        if name == "imagenet100":
            return ConcatDataset([fds.ImageDirectory(os.path.join(path, wnid)) for wnid in imagenet100_classes(root)])
        return _ImagesOnly(fds.ImageFolderDataset(path))
    if name == "voc":
        _require(root, "Pascal VOC", "<data.root>/{images,SegmentationClassAug,sets}")
        return _ImagesOnly(fds.VOCSegmentation(root, split="trainaug"))
    if name == "folder":
        _require(root, "image folder", "any tree of images")
        return fds.ImageDirectory(root)
    if name == "synthetic":
        return _ImagesOnly(
            fds.SyntheticSegmentation(
                num_images=cfg["synthetic_images"], image_size=cfg["synthetic_size"], seed=cfg["synthetic_seed"]
            )
        )
    raise ValueError(f"unknown data.dataset {name!r}; expected one of {DATASETS}, or names joined by '+'")


def build_train_dataset(cfg: dict[str, Any], seed: int) -> MultiCropDataset:
    """Multi-crop training dataset from the ``data`` section of a config."""
    return MultiCropDataset(
        build_image_dataset(cfg),
        global_size=cfg["global_size"],
        local_size=cfg["local_size"],
        num_global=cfg["num_global"],
        num_local=cfg["num_local"],
        global_scale=tuple(cfg["global_scale"]),
        local_scale=tuple(cfg["local_scale"]),
        min_intersection=cfg["min_intersection"],
        seed=seed,
    )
