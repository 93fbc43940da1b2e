"""Image transforms shared by the evaluators: ImageNet normalisation, DINO's eval crop, Hummingbird's joint transforms.

The Hummingbird transforms draw their randomness from an explicit ``torch.Generator`` so that a seeded evaluation
gives the same memory whatever the number of data-loader workers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# open-hummingbird-eval normalises with std (0.229, 0.224, 0.255): a typo for 0.225 kept for exact parity.
HUMMINGBIRD_REFERENCE_STD = (0.229, 0.224, 0.255)


def eval_transform(resize: int = 256, crop: int = 224, interpolation: str = "bicubic") -> T.Compose:
    """DINO k-NN preprocessing: PIL image -> Resize(shorter side) -> CenterCrop -> tensor -> ImageNet normalisation."""
    return T.Compose(
        [
            T.Resize(resize, interpolation=InterpolationMode(interpolation), antialias=True),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """PIL mask of class ids -> (H, W) long tensor."""
    return torch.from_numpy(np.array(mask, dtype=np.int64))


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_resized_crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop), drawn from ``generator``.

    Returns (top, left, crop_height, crop_width).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class HummingbirdTrainTransform:
    """Memory-side transform of open-hummingbird-eval, applied jointly to (image, mask).

    RandomResizedCrop(input_size, scale=(0.5, 2.0), ratio=(3/4, 4/3)) (image bilinear, mask nearest), then
    image-only colour jitter: brightness, contrast, saturation and hue (0.1 each), each applied with p = 0.5; no flip.
    """

    def __init__(
        self,
        input_size: int,
        std=HUMMINGBIRD_REFERENCE_STD,
        scale=(0.5, 2.0),
        ratio=(3 / 4, 4 / 3),
        jitter: float = 0.1,
    ):
        self.input_size, self.std, self.scale, self.ratio, self.jitter = input_size, std, scale, ratio, jitter

    def __call__(self, image: Image.Image, mask: Image.Image, generator: torch.Generator):
        top, left, h, w = random_resized_crop_params(image.width, image.height, self.scale, self.ratio, generator)
        size = [self.input_size, self.input_size]
        image = TF.resized_crop(image, top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resized_crop(mask, top, left, h, w, size, InterpolationMode.NEAREST)
        j = self.jitter
        for adjust, low, high in (
            (TF.adjust_brightness, 1 - j, 1 + j),
            (TF.adjust_contrast, 1 - j, 1 + j),
            (TF.adjust_saturation, 1 - j, 1 + j),
            (TF.adjust_hue, -j, j),
        ):
            if float(torch.rand((), generator=generator)) < 0.5:
                image = adjust(image, _uniform(generator, low, high))
        return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, self.std), mask_to_tensor(mask)


class HummingbirdValTransform:
    """Query-side transform: plain Resize to (input_size, input_size) (aspect ratio not kept), mask nearest."""

    def __init__(self, input_size: int, std=HUMMINGBIRD_REFERENCE_STD):
        self.input_size, self.std = input_size, std

    def __call__(self, image: Image.Image, mask: Image.Image, generator: torch.Generator | None = None):
        size = [self.input_size, self.input_size]
        image = TF.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resize(mask, size, InterpolationMode.NEAREST)
        return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, self.std), mask_to_tensor(mask)
