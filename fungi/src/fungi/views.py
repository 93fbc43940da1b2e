"""Views of each input for the self-supervised objectives. All views of a sample depend only on that sample and a
seed (never on the batch it comes in), so features are independent of batch composition."""

from __future__ import annotations

import hashlib
import math
import random

import torch
import torch.nn.functional as F


def sample_generator(sample: torch.Tensor, seed: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the bytes of ``sample`` (same input -> same views in any batch).
    Half-precision samples are hashed as their exact float32 values (numpy has no bfloat16)."""
    sample = sample.detach().cpu()
    if sample.is_floating_point() and sample.element_size() < 4:
        sample = sample.float()
    digest = hashlib.blake2b(sample.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=8).digest()
    gen = torch.Generator()
    gen.manual_seed((int.from_bytes(digest, "little") ^ seed) & ((1 << 63) - 1))
    return gen


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameter sampling with an explicit generator -> (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize (bicubic or bilinear) of (n, C, h, w) images to ``size``."""
    return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)


def dino_views(
    images: torch.Tensor,
    seed: int,
    num_global: int = 2,
    num_local: int = 10,
    global_scale: tuple[float, float] = (0.25, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.25),
    mode: str = "bicubic",
) -> torch.Tensor:
    """DINO multi-crop of (B, C, H, W) images -> (B, G+L, C, H, W): global crops first, all resized back to (H, W)
    (the paper's local crops are full size too) with ``mode`` interpolation; no flip/colour/blur."""
    _, _, height, width = images.shape
    out = []
    for image in images:
        gen = sample_generator(image, seed)
        crops = []
        for i in range(num_global + num_local):
            scale = global_scale if i < num_global else local_scale
            top, left, h, w = random_resized_crop_box(height, width, scale, (3 / 4, 4 / 3), gen)
            crops.append(resize(image[None, :, top : top + h, left : left + w], (height, width), mode))
        out.append(torch.cat(crops))
    return torch.stack(out)


def patchify_geometry(size: int, num_patches: int = 4, stride_scale: int = 6) -> tuple[int, int, int]:
    """(kernel, stride, crops per side) of the SimCLR patchify views: kernel = size / sqrt(num_patches),
    stride = int(kernel / stride_scale); 224 px -> (112, 18, 7)."""
    kernel = int(size / math.sqrt(num_patches))
    stride = int(kernel / stride_scale)
    return kernel, stride, (size - kernel) // stride + 1


def patchify_views(images: torch.Tensor, num_patches: int = 4, stride_scale: int = 6) -> torch.Tensor:
    """Overlapping square crops of (B, C, S, S) images, row-major (height outer), each resized back to S:
    -> (B, n*n, C, S, S); 49 crops of 112 px at stride 18 for S = 224."""
    batch, channels, height, width = images.shape
    if height != width:
        raise ValueError(f"patchify views need square images, got {height}x{width}")
    kernel, stride, _ = patchify_geometry(height, num_patches, stride_scale)
    crops = images.unfold(2, kernel, stride).unfold(3, kernel, stride)  # (B, C, n, n, k, k)
    n = crops.shape[2]
    crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(batch * n * n, channels, kernel, kernel)
    return resize(crops, (height, width)).reshape(batch, n * n, channels, height, width)


def word_deletion(text: str, num_views: int, p: float, seed: int, max_deleted: int = 10) -> list[str]:
    """``num_views`` copies of whitespace-split ``text``, each missing k distinct words drawn uniformly, as nlpaug's
    RandomWordAug(action="delete", aug_p=p, aug_min=1, aug_max=10): k = min(max(1, ceil(p * n)), max_deleted) for
    n words, further capped at n - 1 so that one word is always kept. Seeded by the text itself and ``seed``."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little") ^ seed)
    words = text.split()
    k = max(0, min(max(1, math.ceil(p * len(words))), max_deleted, len(words) - 1))
    views = []
    for _ in range(num_views):
        deleted = set(rng.sample(range(len(words)), k))
        views.append(" ".join(w for i, w in enumerate(words) if i not in deleted))
    return views


def noise_roll_views(
    spectrograms: torch.Tensor, num_views: int, seed: int, max_noise: float = 0.1, max_shift: int = 10
) -> torch.Tensor:
    """Audio views (SSAST recipe): add U(0, a) * U[0,1) noise, a ~ U(0, max_noise), then roll along time by an
    integer in [-max_shift, max_shift): (B, T, F) -> (B, V, T, F)."""
    out = []
    for spec in spectrograms:
        gen = sample_generator(spec, seed)
        views = []
        for _ in range(num_views):
            amp = torch.rand(1, generator=gen).item() * max_noise
            noisy = spec + torch.rand(spec.shape, generator=gen).to(spec) * amp
            shift = int(torch.randint(-max_shift, max_shift, (1,), generator=gen).item())
            views.append(torch.roll(noisy, shifts=shift, dims=0))
        out.append(torch.stack(views))
    return torch.stack(out)
