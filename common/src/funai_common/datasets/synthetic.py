"""A procedural segmentation dataset with exact masks, for tests and demos.

Each image shows 1-3 axis-aligned rectangles or discs of foreground classes on a textured background (class 0).
Class c always has the same colour (plus mild noise), and shapes snap to a ``cell``-pixel grid so that, at an input
size equal to ``image_size``, patches of ``cell`` pixels (or divisors of it) never straddle two classes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

# Well-separated colours; class 0 (background) first.
PALETTE = np.array(
    [
        (90, 90, 90),
        (220, 40, 40),
        (40, 180, 60),
        (40, 80, 220),
        (230, 200, 40),
        (200, 60, 200),
        (40, 200, 210),
        (240, 140, 30),
        (120, 60, 20),
        (250, 250, 250),
        (20, 20, 20),
        (130, 200, 130),
    ],
    dtype=np.float32,
)
SHAPES = ("rectangle", "disc")


class SyntheticSegmentation(Dataset):
    """``num_images`` seeded images (PIL RGB, PIL "L" mask) with ``num_classes`` classes (background included)."""

    ignore_index = 255

    def __init__(
        self,
        num_images: int = 64,
        image_size: int = 224,
        num_classes: int = 5,
        seed: int = 0,
        cell: int = 16,
        transforms=None,
        noise: float = 12.0,
    ):
        if not 2 <= num_classes <= len(PALETTE):
            raise ValueError(f"num_classes must be in [2, {len(PALETTE)}], got {num_classes}")
        if image_size % cell:
            raise ValueError(f"image_size {image_size} must be a multiple of cell {cell}")
        self.num_images, self.image_size, self.num_classes = num_images, image_size, num_classes
        self.seed, self.cell, self.transforms, self.noise = seed, cell, transforms, noise
        self.class_names = ("background",) + tuple(f"class_{c}" for c in range(1, num_classes))

    def __len__(self) -> int:
        return self.num_images

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(image (H, W, 3) uint8, mask (H, W) uint8, label = class covering most foreground pixels)."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, i])
        size, grid = self.image_size, self.image_size // self.cell
        mask = np.zeros((size, size), dtype=np.uint8)
        yy, xx = np.mgrid[:size, :size]
        for _ in range(rng.integers(1, 4)):
            cls = rng.integers(1, self.num_classes)
            w, h = rng.integers(max(1, grid // 4), max(2, grid // 2) + 1, size=2)
            x0, y0 = rng.integers(0, grid - w + 1), rng.integers(0, grid - h + 1)
            x0, y0, w, h = x0 * self.cell, y0 * self.cell, w * self.cell, h * self.cell
            if SHAPES[rng.integers(len(SHAPES))] == "rectangle":
                inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            else:
                # A disc drawn on the cell grid: a cell belongs to it when its centre is inside the ellipse.
                cx, cy = (xx // self.cell + 0.5) * self.cell, (yy // self.cell + 0.5) * self.cell
                inside = ((cx - x0 - w / 2) / (w / 2)) ** 2 + ((cy - y0 - h / 2) / (h / 2)) ** 2 <= 1
            mask[inside] = cls
        image = PALETTE[mask] + rng.normal(0, self.noise, (size, size, 3)).astype(np.float32)
        stripes = 10 * np.sin(xx / 5.0 + rng.uniform(0, 6.3))[..., None] * (mask == 0)[..., None]
        image = np.clip(image + stripes, 0, 255).astype(np.uint8)
        counts = np.bincount(mask.reshape(-1), minlength=self.num_classes)[1:]
        return image, mask, int(counts.argmax()) + 1

    def __getitem__(self, i: int):
        image, mask, _ = self.sample(i)
        image, mask = Image.fromarray(image, mode="RGB"), Image.fromarray(mask, mode="L")
        return self.transforms(image, mask) if self.transforms else (image, mask)


class SyntheticClassification(Dataset):
    """The synthetic images labelled by their dominant foreground class (label in [0, num_classes - 1))."""

    def __init__(self, segmentation: SyntheticSegmentation, transform=None):
        self.segmentation, self.transform = segmentation, transform
        self.num_classes = segmentation.num_classes - 1

    def __len__(self) -> int:
        return len(self.segmentation)

    def __getitem__(self, i: int):
        image, _, label = self.segmentation.sample(i)
        image = Image.fromarray(image, mode="RGB")
        return (self.transform(image) if self.transform else image), label - 1
