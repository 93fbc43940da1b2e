"""DoRA clip augmentations (spec section b "Augmentation"): shared pre-crop, one shared global view, per-frame
photometric jitter, and L local views cropped independently per frame. ``num_global_crops=2`` with per-view blur and
solarisation gives DINO's multi-crop views for the ``method: dino`` baseline. All randomness comes from a
``torch.Generator`` so that a clip's views are a function of its seed (exact resume, any worker count)."""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_params


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def rrc_params(height: int, width: int, scale: tuple[float, float], g: torch.Generator, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop box (top, left, h, w), torchvision's algorithm driven by ``g``."""
    return random_resized_crop_params(width, height, scale, ratio, g)


def photometric(frame: torch.Tensor, g: torch.Generator, blur_p: float, solarize_p: float = 0.0) -> torch.Tensor:
    """Colour jitter (0.4, 0.4, 0.2, 0.1) w.p. 0.8 in random order, grayscale w.p. 0.2, Gaussian blur (sigma 0.1-2)
    w.p. ``blur_p``, then solarisation (PIL's: values >= 128/255 inverted) w.p. ``solarize_p`` (no draw when 0), on
    one (3, H, W) frame in [0, 1]."""
    if torch.rand((), generator=g) < 0.8:
        factors = [
            _uniform(g, 0.6, 1.4),
            _uniform(g, 0.6, 1.4),
            _uniform(g, 0.8, 1.2),
            _uniform(g, -0.1, 0.1),
        ]
        for i in torch.randperm(4, generator=g).tolist():
            if i == 0:
                frame = TF.adjust_brightness(frame, factors[0])
            elif i == 1:
                frame = TF.adjust_contrast(frame, factors[1])
            elif i == 2:
                frame = TF.adjust_saturation(frame, factors[2])
            else:
                frame = TF.adjust_hue(frame, factors[3])
    if torch.rand((), generator=g) < 0.2:
        frame = TF.rgb_to_grayscale(frame, num_output_channels=3)
    if torch.rand((), generator=g) < blur_p:
        sigma = _uniform(g, 0.1, 2.0)
        k = 2 * math.ceil(3 * sigma) + 1
        frame = TF.gaussian_blur(frame, [k, k], [sigma, sigma])
    if solarize_p > 0 and torch.rand((), generator=g) < solarize_p:
        frame = TF.solarize(frame, 128 / 255)
    return frame


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (..., 3, H, W) in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def _per_view(value, n: int, name: str) -> list[float]:
    """A probability for each of ``n`` global views from a number or a list of n numbers."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"augment.{name}={value!r}: expected a number or a list of {n} (augment.num_global_crops)")
    return [float(v) for v in values]


class ClipAugmentation:
    """uint8 clip (T, H, W, 3) -> (global (T, 3, G, G), [local (T, 3, l, l)] * L), all ImageNet-normalised.

    With ``num_global_crops=n > 1`` the global views come stacked as (n, T, 3, G, G), each with its own crop and
    flip (shared over the frames) and its own ``global_blur_p`` / ``global_solarize_p`` entry. ``precrop_size=None``
    crops every view from the whole frame instead of a shared pre-crop; ``local_flip_p`` flips local crops (DINO).
    """

    def __init__(
        self,
        precrop_size: int | None = 300,
        precrop_scale: tuple[float, float] = (0.2, 1.0),
        global_size: int = 224,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_size: int = 112,
        local_scale: tuple[float, float] = (0.05, 0.4),
        num_local_crops: int = 6,
        global_blur_p: float | list[float] = 0.1,
        local_blur_p: float = 0.5,
        num_global_crops: int = 1,
        global_solarize_p: float | list[float] = 0.0,
        global_interpolation: str = "bilinear",
        local_flip_p: float = 0.0,
    ) -> None:
        if num_global_crops < 1:
            raise ValueError(f"augment.num_global_crops={num_global_crops}: expected >= 1")
        self.precrop_size = precrop_size
        self.precrop_scale = tuple(precrop_scale)
        self.global_size = global_size
        self.global_scale = tuple(global_scale)
        self.local_size = local_size
        self.local_scale = tuple(local_scale)
        self.num_local_crops = num_local_crops
        self.num_global_crops = num_global_crops
        self.global_blur_p = _per_view(global_blur_p, num_global_crops, "global_blur_p")
        self.global_solarize_p = _per_view(global_solarize_p, num_global_crops, "global_solarize_p")
        self.local_blur_p = local_blur_p
        if global_interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"augment.global_interpolation={global_interpolation!r}: expected bilinear or bicubic")
        self.global_interpolation = InterpolationMode(global_interpolation)
        self.local_flip_p = local_flip_p

    def __call__(self, clip, g: torch.Generator):
        x = torch.as_tensor(clip).permute(0, 3, 1, 2).float().div_(255)  # (T, 3, H, W)
        if self.precrop_size is not None:
            top, left, h, w = rrc_params(x.shape[-2], x.shape[-1], self.precrop_scale, g)
            size = [self.precrop_size, self.precrop_size]
            x = TF.resized_crop(x, top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True).clamp_(0, 1)
        height, width = x.shape[-2:]
        globals_ = []
        size = [self.global_size, self.global_size]
        for blur_p, solarize_p in zip(self.global_blur_p, self.global_solarize_p):
            top, left, h, w = rrc_params(height, width, self.global_scale, g)
            gl = TF.resized_crop(x, top, left, h, w, size, self.global_interpolation, antialias=True).clamp_(0, 1)
            if torch.rand((), generator=g) < 0.5:
                gl = gl.flip(-1)
            globals_.append(normalize(torch.stack([photometric(f, g, blur_p, solarize_p) for f in gl])))
        locals_ = []
        size = [self.local_size, self.local_size]
        for _ in range(self.num_local_crops):
            frames = []
            for f in x:
                top, left, h, w = rrc_params(height, width, self.local_scale, g)
                crop = TF.resized_crop(f, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
                if self.local_flip_p > 0 and torch.rand((), generator=g) < self.local_flip_p:
                    crop = crop.flip(-1)
                frames.append(photometric(crop.clamp_(0, 1), g, self.local_blur_p))
            locals_.append(normalize(torch.stack(frames)))
        return (globals_[0] if self.num_global_crops == 1 else torch.stack(globals_)), locals_


def build_augmentation(cfg: dict) -> ClipAugmentation:
    """ClipAugmentation from the ``augment`` config section."""
    return ClipAugmentation(**cfg["augment"])
