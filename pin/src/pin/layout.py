"""Grid-aligned layout sampling of the synthetic compositions (sizes, positions, overlap rule).

Boxes are inclusive cell boxes [gx, gy, gx+s_x, gy+s_y] on a G x G grid; an object with extents (s_x, s_y) covers
(s_x+1) x (s_y+1) cells. Pixel boxes use cell edges: [gx*c, gy*c, (gx+s_x+1)*c, (gy+s_y+1)*c], c = image_size/G.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class LayoutSampler:
    """Sample k grid boxes for objects with given aspect ratios (w/h), following the reference recipe.

    Args:
        grid: G, cells per side. image_size: pixels per side (cell = image_size / G).
        min_fractions: f_k for k = 1, 2, 3, ...; minimum extent in cells round(f_k * G) (5, 3, 2 for G = 16).
        max_cells: maximum extent bound (16 for every k); s is drawn in [min, max_cells - 1].
        overlap_threshold: a position is valid if the summed overlap ratio with the placed boxes is <= this.
        overlap_both: ratio = max(inter/area_new, inter/area_old) (else inter/area_old, as the reference's
            `compute_overlap_ratio(new, old)`).
        outside_ratio: allowed fraction of a box outside the image (0: fully inside).
        max_resample: size resamples when no position is valid, before the minimum-size fallback.
    """

    def __init__(
        self,
        grid: int = 16,
        image_size: int = 224,
        min_fractions: Sequence[float] = (0.3, 0.2, 0.1),
        max_cells: int = 16,
        overlap_threshold: float = 0.5,
        overlap_both: bool = True,
        outside_ratio: float = 0.0,
        max_resample: int = 10,
    ) -> None:
        self.grid, self.image_size = grid, image_size
        self.cell = image_size / grid
        self.min_fractions = tuple(min_fractions)
        self.max_cells = max_cells
        self.overlap_threshold = overlap_threshold
        self.overlap_both = overlap_both
        self.outside_ratio = outside_ratio
        self.max_resample = max_resample
        if not 2 <= max_cells <= grid:  # a box spans up to max_cells - 1 cells past its first, inside the grid
            raise ValueError(
                f"data.max_cells={max_cells}: expected 2 to codec.grid={grid} (the largest box's extent + 1)"
            )
        for k, f in enumerate(self.min_fractions, 1):
            if not 0 <= self.min_cells(k) <= max_cells - 1:
                raise ValueError(
                    f"data.min_fractions={list(self.min_fractions)}: {k} object(s) get a minimum extent of round({f}"
                    f" x codec.grid={grid}) = {self.min_cells(k)} cells, above data.max_cells - 1 = {max_cells - 1}"
                )

    def min_cells(self, k: int) -> int:
        """Minimum extent for an image with k objects: round(f_k * G)."""
        if not 1 <= k <= len(self.min_fractions):
            raise ValueError(f"k={k} objects; min_fractions covers 1..{len(self.min_fractions)}")
        return int(round(self.min_fractions[k - 1] * self.grid))

    def sample_extent(self, rng: np.random.Generator, k: int, aspect: float) -> tuple[int, int]:
        """(s_x, s_y) keeping aspect = w/h: the longer side ~ U{min..max-1}, the other round(long / ratio) >= 1."""
        lo, hi = self.min_cells(k), self.max_cells - 1
        return self.fit_extent(int(rng.integers(lo, hi + 1)), aspect)

    @staticmethod
    def fit_extent(long: int, aspect: float) -> tuple[int, int]:
        """(s_x, s_y) with the longer side `long` and the other round(long / ratio), at least 1."""
        if aspect >= 1:
            return long, max(1, int(round(long / aspect)))
        return max(1, int(round(long * aspect))), long

    def pixel_box(self, box) -> np.ndarray:
        """Inclusive cell box -> xyxy pixels of the paste rectangle (cell edges)."""
        x1, y1, x2, y2 = box
        c = self.cell
        return np.array([x1 * c, y1 * c, (x2 + 1) * c, (y2 + 1) * c], dtype=np.float64)

    def overlap_ratio(self, new, old) -> float:
        """Intersection over the placed (old) box's area, or the max with over the new box's area, in pixels."""
        a, b = self.pixel_box(new), self.pixel_box(old)
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        area_a = (a[2] - a[0]) * (a[3] - a[1])
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        return max(inter / area_a, inter / area_b) if self.overlap_both else inter / area_b

    def outside_fraction(self, box) -> float:
        """Fraction of the box's area outside the image."""
        p = self.pixel_box(box)
        s = self.image_size
        iw = max(0.0, min(p[2], s) - max(p[0], 0))
        ih = max(0.0, min(p[3], s) - max(p[1], 0))
        area = (p[2] - p[0]) * (p[3] - p[1])
        return 1.0 - iw * ih / area

    def valid_positions(self, extent: tuple[int, int], placed: Sequence) -> list[tuple[int, int]]:
        """Every (x, y) with x in -s_x..G-2, y in -s_y..G-2 meeting the overlap and outside rules (row-major order).

        Vectorised form of `outside_fraction` and `overlap_ratio` over all candidate positions.
        """
        sx, sy = extent
        c, s = self.cell, self.image_size
        ys, xs = np.meshgrid(np.arange(-sy, self.grid - 1), np.arange(-sx, self.grid - 1), indexing="ij")
        xs, ys = xs.ravel(), ys.ravel()
        x1, y1 = xs * c, ys * c
        x2, y2 = (xs + sx + 1) * c, (ys + sy + 1) * c
        area = (x2 - x1) * (y2 - y1)
        inside = (np.minimum(x2, s) - np.maximum(x1, 0)).clip(0) * (np.minimum(y2, s) - np.maximum(y1, 0)).clip(0)
        ok = 1.0 - inside / area <= self.outside_ratio + 1e-12
        total = np.zeros_like(area)
        for old in placed:
            b = self.pixel_box(old)
            inter = (np.minimum(x2, b[2]) - np.maximum(x1, b[0])).clip(0) * (
                np.minimum(y2, b[3]) - np.maximum(y1, b[1])
            ).clip(0)
            ratio = inter / ((b[2] - b[0]) * (b[3] - b[1]))
            if self.overlap_both:
                ratio = np.maximum(ratio, inter / area)
            total += ratio
        ok &= total <= self.overlap_threshold + 1e-12
        return [(int(x), int(y)) for x, y in zip(xs[ok], ys[ok])]

    def sample(self, rng: np.random.Generator, aspects: Sequence[float]) -> list[list[int]]:
        """Inclusive cell boxes, one per aspect ratio, clipped to 0..G-1."""
        k = len(aspects)
        placed: list[tuple[int, int, int, int]] = []
        for aspect in aspects:
            box = None
            for _ in range(self.max_resample if placed else 1):
                sx, sy = self.sample_extent(rng, k, aspect)
                if not placed:
                    x = int(rng.integers(0, self.grid - sx))
                    y = int(rng.integers(0, self.grid - sy))
                    box = (x, y, x + sx, y + sy)
                    break
                positions = self.valid_positions((sx, sy), placed)
                if positions:
                    x, y = positions[int(rng.integers(len(positions)))]
                    box = (x, y, x + sx, y + sy)
                    break
            if box is None:  # the reference's fallback: minimum size, aspect ratio kept, overlap ignored
                sx, sy = self.fit_extent(self.min_cells(k), aspect)
                x, y = int(rng.integers(0, self.grid - sx)), int(rng.integers(0, self.grid - sy))
                box = (x, y, x + sx, y + sy)
            placed.append(box)
        g = self.grid - 1
        return [[min(max(v, 0), g) for v in b] for b in placed]
