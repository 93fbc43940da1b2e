"""Box <-> text grid codec and ground-truth box conversions into the square evaluation frame.

Boxes in text are written on a G x G grid: the vocabulary holds the G+1 grid-line positions v_i = fmt(M*i/G) and an
inclusive cell box (x1, y1, x2, y2) is written "[v[x1],v[y1],v[x2+1],v[y2+1]]" (no spaces).
"""

from __future__ import annotations

import math
import re

import numpy as np

# Needs a space before "[" and takes the first match in the whole decoded output (prompt included), as the reference.
BOX_PATTERN = re.compile(r" \[(.+?),(.+?),(.+?),(.+?)\]")


def format_value(value: float) -> str:
    """Integer if integral, else one decimal if that is exact, else two decimals (Python "%.2f" rounding)."""
    if float(value).is_integer():
        return str(int(value))
    if round(value, 1) == value:
        return f"{value:.1f}"
    return f"{value:.2f}"


class GridCodec:
    """Encode inclusive grid-cell boxes as text and parse generated text back into pixel boxes.

    Args:
        grid: number of cells G per side.
        max_value: M, the value written for the last grid line (224 gives the pixel positions of the grid lines).
        image_size: side of the square frame the decoded pixel boxes live in.
    """

    def __init__(self, grid: int = 16, max_value: float = 224, image_size: int = 224) -> None:
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid = grid
        self.max_value = max_value
        self.image_size = image_size
        self.cell = math.ceil(image_size / grid)
        self.vocabulary = [format_value(max_value * i / grid) for i in range(grid + 1)]
        self._index = {v: i for i, v in enumerate(self.vocabulary)}

    @property
    def fallback_box(self) -> list[float]:
        """The box the reference scores when the text cannot be parsed: index box (0, 0, 1, 1) in pixels."""
        return [0.0, 0.0, float(self.cell), float(self.cell)]

    def encode(self, cells) -> str:
        """Inclusive cells [x1, y1, x2, y2] (0..G-1) -> "[v[x1],v[y1],v[x2+1],v[y2+1]]"."""
        x1, y1, x2, y2 = (int(c) for c in cells)
        if not (0 <= x1 <= x2 < self.grid and 0 <= y1 <= y2 < self.grid):
            raise ValueError(f"cells {list(cells)} must satisfy 0 <= x1 <= x2 < {self.grid} and 0 <= y1 <= y2")
        v = self.vocabulary
        return f"[{v[x1]},{v[y1]},{v[x2 + 1]},{v[y2 + 1]}]"

    def decode_indices(self, text: str) -> tuple[int, int, int, int] | None:
        """Grid-line indices (i_x1, i_y1, i_x2, i_y2) of the first valid-looking " [a,b,c,d]", or None if invalid."""
        match = BOX_PATTERN.search(text)
        if match is None:
            return None
        parts = match.groups()
        # Exact string match against the vocabulary; x1 < x2 also keeps x1 in v[:-1] and x2 in v[1:].
        idx = [self._index.get(p) for p in parts]
        if any(i is None for i in idx):
            return None
        x1, y1, x2, y2 = idx
        if not (x1 < x2 and y1 < y2):
            return None
        return x1, y1, x2, y2

    def decode(self, text: str) -> list[float]:
        """Parse the first " [a,b,c,d]" into an xyxy pixel box; the fallback [0, 0, cell, cell] when invalid."""
        idx = self.decode_indices(text)
        if idx is None:
            return self.fallback_box
        x1, y1, x2, y2 = idx
        c, s = self.cell, self.image_size
        return [float(x1 * c), float(y1 * c), float(min(x2 * c, s)), float(min(y2 * c, s))]

    def cells_to_pixels(self, cells) -> list[float]:
        """Inclusive cells -> the xyxy pixel rectangle they cover (what `decode(encode(cells))` returns)."""
        x1, y1, x2, y2 = (int(c) for c in cells)
        c, s = self.cell, self.image_size
        return [float(x1 * c), float(y1 * c), float(min((x2 + 1) * c, s)), float(min((y2 + 1) * c, s))]

    def snap(self, box) -> list[float]:
        """An xyxy pixel box -> the smallest box the codec can write that contains it (the IoU_grid ground truth):
        near edges floored, far edges ceiled to grid lines, at least one cell per side, clipped to the image."""
        c, g = self.cell, self.grid
        x1, y1 = (min(max(math.floor(v / c), 0), g - 1) for v in box[:2])
        x2 = min(max(math.ceil(box[2] / c) - 1, x1), g - 1)
        y2 = min(max(math.ceil(box[3] / c) - 1, y1), g - 1)
        return self.cells_to_pixels([x1, y1, x2, y2])

    def random_cells(self, rng: np.random.Generator) -> list[int]:
        """A random valid grid box (the "random box" baseline): per axis two uniform cells, sorted, so x1 <= x2 and
        y1 <= y2; a box one cell wide (or high) is half as likely as each wider one."""
        x = sorted(rng.integers(0, self.grid, size=2).tolist())
        y = sorted(rng.integers(0, self.grid, size=2).tolist())
        return [x[0], y[0], x[1], y[1]]


def coco_box_to_frame(box_xywh, width: int, height: int, image_size: int = 224) -> list[float]:
    """COCO xywh in the original image -> xyxy in the anisotropically resized square frame.

    x, y, w, h are each int-truncated after scaling and the far edge is clipped to image_size - 1 (reference).
    """
    x, y, w, h = box_xywh
    sx, sy = image_size / width, image_size / height
    x, w = int(x * sx), int(w * sx)
    y, h = int(y * sy), int(h * sy)
    return [float(x), float(y), float(min(x + w, image_size - 1)), float(min(y + h, image_size - 1))]


def voc_box_to_frame(box_xyxy, width: int, height: int, image_size: int = 224) -> list[float]:
    """PVOC xyxy (1-based pixels) -> int(int(v) * ratio) clipped to [1, image_size] (reference)."""
    x1, y1, x2, y2 = box_xyxy
    sx, sy = image_size / width, image_size / height
    out = [int(int(x1) * sx), int(int(y1) * sy), int(int(x2) * sx), int(int(y2) * sy)]
    return [float(min(max(v, 1), image_size)) for v in out]
