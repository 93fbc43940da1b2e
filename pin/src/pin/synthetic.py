"""Synthetic training data: RGBA object cut-outs pasted on backgrounds at grid-aligned positions.

Object pool layouts: a folder per class (`<root>/<class name>/*.png`, RGBA) or the X-Paste/LVIS list
`LVIS_instance_pools.json` = {lvis_name: [png paths relative to the json's folder]}. Names are normalised ("_" -> " ",
" (...)" dropped), "projectile" is removed, and the held-out (zero-shot) classes are split off by name.
Backgrounds: any image folder (BG-20k `train/` or `testval/`), or procedural textures.
Every composition is a pure function of (seed, epoch, index), so workers, resumes and replicas agree.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from funai_common.datasets import open_image

from .heldout import HELD_OUT_CLASSES
from .layout import LayoutSampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def normalise_name(name: str) -> str:
    """LVIS name -> prompt name: "_" -> " " and a trailing " (...)" dropped ("bow_(weapon)" -> "bow")."""
    return re.sub(r"\s*\(.*?\)", "", name.replace("_", " ")).strip()


def crop_to_alpha(rgba: np.ndarray) -> np.ndarray:
    """Crop an (H, W, 4) uint8 cut-out to its alpha bounding box (unchanged when alpha is empty)."""
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    if len(xs) == 0:
        return rgba
    return rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


class ObjectPool:
    """Named RGBA instances: `instances` is a list of (name, source) with source a path or an (H, W, 4) array."""

    def __init__(self, instances: Sequence[tuple[str, object]]) -> None:
        self.instances = list(instances)
        self.by_name: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(self.instances):
            self.by_name.setdefault(name, []).append(i)
        self.names = sorted(self.by_name)

    def __len__(self) -> int:
        return len(self.instances)

    def load(self, index: int) -> np.ndarray:
        """(H, W, 4) uint8 cut-out cropped to its alpha box."""
        src = self.instances[index][1]
        arr = src if isinstance(src, np.ndarray) else np.asarray(open_image(src, "RGBA"))
        return crop_to_alpha(arr)

    @classmethod
    def from_folder(cls, root: str | Path) -> ObjectPool:
        """`<root>/<class>/*.png` (class folder names normalised like LVIS names)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"object pool {root} not found; expected <root>/<class name>/*.png RGBA cut-outs")
        items = [
            (normalise_name(d.name), p)
            for d in sorted(root.iterdir())
            if d.is_dir()
            for p in sorted(d.iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not items:
            raise FileNotFoundError(f"object pool {root} holds no class folders with images")
        return cls(_drop_excluded(items))

    @classmethod
    def from_json(cls, path: str | Path) -> ObjectPool:
        """X-Paste/LVIS list {lvis_name: [png paths]}; relative paths are taken from the json's folder, and absolute
        ones that do not exist (the authors' machine) are re-rooted by `resolve_pool_path`. Every file is checked
        here, so a missing cut-out fails at start rather than in a data-loader worker."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"object list {path} not found; expected LVIS_instance_pools.json")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"object list {path} is not valid JSON: {err.msg} at line {err.lineno}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"object list {path}: expected {{class name: [cut-out paths]}}, got a {type(data).__name__}"
            )
        bad = next((name for name, paths in data.items() if not isinstance(paths, list)), None)
        if bad is not None:
            raise ValueError(
                f"object list {path}: the entry of {bad!r} is a {type(data[bad]).__name__}, expected a list"
            )
        items = [(normalise_name(n), resolve_pool_path(p, path.parent)) for n, paths in data.items() for p in paths]
        items = _drop_excluded(items)
        with ThreadPoolExecutor(max_workers=32) as pool:  # ~60k stats: seconds, not minutes, on network storage
            found = list(pool.map(lambda item: item[1].is_file(), items))
        missing = [str(file) for (_, file), ok in zip(items, found) if not ok]
        if missing:
            raise FileNotFoundError(
                f"object list {path}: {len(missing)} of {len(items)} cut-outs not found, e.g. {missing[:3]} (paths are "
                f"relative to the list's folder; absolute ones are looked up under {path.parent / 'images'} after "
                "their last 'images/')"
            )
        return cls(items)

    def split(
        self, held_out: Sequence[str] = HELD_OUT_CLASSES, val_size: int = 0, seed: int = 10
    ) -> tuple[ObjectPool, ObjectPool, ObjectPool]:
        """(train, val, zero_shot): held-out names go to zero_shot; the rest is shuffled with `seed` and the last
        `val_size` instances go to val."""
        held = {h.lower() for h in held_out}
        zero = [it for it in self.instances if it[0].lower() in held]
        rest = [it for it in self.instances if it[0].lower() not in held]
        order = np.random.default_rng(seed).permutation(len(rest))
        rest = [rest[i] for i in order]
        cut = len(rest) - val_size
        return ObjectPool(rest[:cut]), ObjectPool(rest[cut:]), ObjectPool(zero)


def resolve_pool_path(entry: str, root: Path) -> Path:
    """A path of the object list: relative -> root/entry; absolute and missing -> root/images/<part after the last
    "images" component> (the released list holds the authors' absolute paths); otherwise unchanged."""
    p = Path(entry)
    if not p.is_absolute():
        return root / p
    if p.exists() or "images" not in p.parts:
        return p
    last = len(p.parts) - 1 - p.parts[::-1].index("images")
    return root.joinpath("images", *p.parts[last + 1 :])


def _drop_excluded(items):
    return [it for it in items if it[0] != "projectile"]


SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of a procedural shape filling its box."""
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx + 0.5) / w * 2 - 1, (yy + 0.5) / h * 2 - 1
    r = np.hypot(u, v)
    ang = np.arctan2(v, u)
    masks = {
        "circle": r <= 1,
        "square": np.ones((h, w), bool),
        "triangle": (v >= -1) & (np.abs(u) <= (v + 1) / 2),
        "diamond": np.abs(u) + np.abs(v) <= 1,
        "cross": (np.abs(u) <= 0.33) | (np.abs(v) <= 0.33),
        "ring": (r <= 1) & (r >= 0.55),
        "star": r <= 0.55 + 0.45 * np.cos(5 * ang) ** 2,
        "hexagon": (np.abs(v) <= 0.87) & (np.abs(u) * 0.87 + np.abs(v) * 0.5 <= 0.87),
    }
    if shape not in masks:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return masks[shape]


def procedural_pool(names: Sequence[str], per_class: int = 8, seed: int = 0, size: int = 64) -> ObjectPool:
    """Cut-outs for names "<colour> <shape>" (or a bare shape, random colour) with aspect log-uniform in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    items = []
    for name in names:
        parts = name.split()
        shape = parts[-1]
        for _ in range(per_class):
            aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
            w, h = (size, max(4, round(size / aspect))) if aspect >= 1 else (max(4, round(size * aspect)), size)
            colour = COLOURS[parts[0]] if len(parts) > 1 else tuple(rng.integers(30, 230, 3))
            rgba = np.zeros((h, w, 4), np.uint8)
            jitter = rng.integers(-20, 21, 3)
            rgba[..., :3] = np.clip(np.array(colour) + jitter, 0, 255)
            rgba[..., 3] = shape_mask(shape, h, w) * 255
            items.append((name, rgba))
    return ObjectPool(items)


class Backgrounds:
    """Backgrounds from an image folder (recursive), or procedural textures when `root` is None."""

    def __init__(self, root: str | Path | None = None, image_size: int = 224) -> None:
        self.image_size = image_size
        self.paths: list[Path] = []
        if root is not None:
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"background folder {root} not found; expected images (BG-20k train/)")
            self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self.paths:
                raise FileNotFoundError(f"background folder {root} holds no images")

    def sample(self, rng: np.random.Generator) -> Image.Image:
        """An RGB image_size x image_size background."""
        s = self.image_size
        if self.paths:
            path = self.paths[int(rng.integers(len(self.paths)))]
            # Pillow's default filter (bicubic), as the reference's `resize(size)` without one
            return open_image(path).resize((s, s), Image.BICUBIC)
        base = rng.uniform(60, 200, size=(2, 2, 3))
        low = Image.fromarray(base.astype(np.uint8)).resize((s, s), Image.BILINEAR)
        noise = rng.normal(0, 12, size=(s // 8, s // 8, 3))
        noise = np.asarray(Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8)).resize((s, s)))
        arr = np.asarray(low, np.float32) + noise.astype(np.float32) - 128
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@dataclass
class Composition:
    """One synthetic image, its objects (in paste order), and the object chosen as the training target."""

    image: Image.Image
    names: list[str]
    boxes: list[list[int]]  # inclusive cells
    target: int
    phrase: str  # the target's object phrase (name or synonym, possibly with referral words)
    phrases: list[str]  # every object's phrase (the reference's `obj_rel_names`)


OBJECT_SAMPLING = ("instances", "classes")
RELATIVE_FORMS = ("{word} {name}", "{name} {word}", "{name} on {word}")
ABSOLUTE_FORMS = (*RELATIVE_FORMS, "{name} at the {word}")


class Composer:
    """Paste k objects from a pool on a background following a LayoutSampler (the composition function C).

    Args:
        pool, backgrounds, sampler: the sources and the layout rule.
        seed: base seed; a composition is a function of (seed, epoch, index).
        max_objects: k ~ U{1..max_objects} when not fixed; `fixed_objects` objects while fixed.
        same_object_likelihood: per object after the first, the probability that it is replaced by another cut-out
            of the previous object's class (unless that class is already repeated), as the reference. Any value > 0
            also switches the referral phrases on (the reference's gate): an object whose class occurs more than
            once gets a relative word (`relative_position_word`), any other one an absolute word with probability
            `pos_img_referral`.
        pos_img_referral: probability of an absolute position word ("left", "center", ...) for an object without a
            same-class twin; only used when same_object_likelihood > 0.
        object_sampling: "instances" (the reference: every object a cut-out drawn uniformly with replacement, so
            classes are weighted by their instance counts and may repeat) or "classes" (k distinct class names drawn
            uniformly, then a uniform cut-out of each; for small procedural pools).
        synonyms: {name: [synonyms]} (`pin.synonyms.load_synonyms`) to describe every object by one of its class's
            synonyms, drawn uniformly (the reference's `synonyms_description`); None (default): by its name. A class
            without synonyms keeps its name (with a warning).
    """

    def __init__(
        self,
        pool: ObjectPool,
        backgrounds: Backgrounds,
        sampler: LayoutSampler,
        seed: int = 0,
        max_objects: int = 3,
        fixed_objects: int = 3,
        same_object_likelihood: float = 0.0,
        pos_img_referral: float = 0.0,
        object_sampling: str = "instances",
        synonyms: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if len(pool.names) == 0:
            raise ValueError("object pool is empty")
        if object_sampling not in OBJECT_SAMPLING:
            raise ValueError(f"object_sampling={object_sampling!r}; expected one of {OBJECT_SAMPLING}")
        if pos_img_referral > 0 and same_object_likelihood <= 0:
            warnings.warn(
                "pos_img_referral has no effect while same_object_likelihood is 0 (as in the reference, referral "
                "phrases are only built when same_object_likelihood > 0)",
                stacklevel=2,
            )
        self.pool, self.backgrounds, self.sampler = pool, backgrounds, sampler
        self.seed, self.max_objects, self.fixed_objects = seed, max_objects, fixed_objects
        self.same_object_likelihood, self.pos_img_referral = same_object_likelihood, pos_img_referral
        self.object_sampling, self.synonyms = object_sampling, synonyms
        missing = [n for n in pool.names if not synonyms.get(n)] if synonyms is not None else []
        if missing:
            warnings.warn(
                f"{len(missing)} of {len(pool.names)} classes have no synonyms and keep their name, e.g. {missing[:5]}",
                stacklevel=2,
            )

    def draw_objects(self, rng: np.random.Generator, k: int) -> list[int]:
        """Pool indices of the k objects, in paste order ("classes": min(k, number of classes) objects)."""
        pool = self.pool
        if self.object_sampling == "instances":
            picks = [int(i) for i in rng.integers(len(pool), size=k)]
        else:
            names = rng.choice(pool.names, size=min(k, len(pool.names)), replace=False)
            picks = [pool.by_name[n][int(rng.integers(len(pool.by_name[n])))] for n in names]
        if self.same_object_likelihood > 0:
            names = [pool.instances[i][0] for i in picks]
            for j in range(1, len(picks)):
                previous = names[j - 1]
                if rng.random() < self.same_object_likelihood and previous not in names[: j - 1]:
                    same = pool.by_name[previous]
                    picks[j], names[j] = same[int(rng.integers(len(same)))], previous
        return picks

    def compose(self, index: int, epoch: int = 0, fixed: bool = True) -> Composition:
        """The composition number `index` of `epoch`; `fixed` -> exactly `fixed_objects` objects."""
        rng = np.random.default_rng([self.seed, epoch, index])
        k = self.fixed_objects if fixed else int(rng.integers(1, self.max_objects + 1))
        instances = self.draw_objects(rng, k)
        names = [str(self.pool.instances[i][0]) for i in instances]
        cutouts = [self.pool.load(i) for i in instances]
        aspects = [c.shape[1] / c.shape[0] for c in cutouts]
        boxes = self.sampler.sample(rng, aspects)
        image = self.backgrounds.sample(rng).copy()
        cell = self.sampler.cell
        for cut, box in zip(cutouts, boxes):
            w = round((box[2] - box[0] + 1) * cell)
            h = round((box[3] - box[1] + 1) * cell)
            obj = Image.fromarray(cut).resize((w, h), Image.BICUBIC)  # Pillow's default, as the reference
            image.paste(obj, (round(box[0] * cell), round(box[1] * cell)), obj)
        target = int(rng.integers(len(names)))
        described = [self.describe(name, rng) for name in names]
        phrases = [self.referral_phrase(i, names, boxes, rng, described[i]) for i in range(len(names))]
        return Composition(image, names, boxes, target, phrases[target], phrases)

    def describe(self, name: str, rng: np.random.Generator) -> str:
        """The word for an object of class `name`: one of its synonyms (uniformly) when synonyms are on, else the
        name; no draw from `rng` without synonyms, so the option off leaves every composition unchanged."""
        options = self.synonyms.get(name) if self.synonyms is not None else None
        return options[int(rng.integers(len(options)))] if options else name

    def referral_phrase(
        self, index: int, names: Sequence[str], boxes: Sequence, rng: np.random.Generator, name: str
    ) -> str:
        """The phrase of object `index` described as `name`: with a relative word when its class occurs more than
        once, else with an absolute word with probability pos_img_referral; bare while same_object_likelihood is 0."""
        if self.same_object_likelihood <= 0:
            return name
        word = relative_position_word(index, names, boxes, rng)
        if word is not None:
            return referral_form(name, word, RELATIVE_FORMS, rng)
        if rng.random() < self.pos_img_referral:
            return referral_form(
                name, absolute_position_word(boxes[index], self.sampler.grid, rng), ABSOLUTE_FORMS, rng
            )
        return name


def referral_form(name: str, word: str, forms: Sequence[str], rng: np.random.Generator) -> str:
    """One of `forms` ("{word} {name}", "{name} {word}", "{name} on {word}"[, "{name} at the {word}"]), uniformly."""
    return forms[int(rng.integers(len(forms)))].format(name=name, word=word)


def corner_overlap(a, b) -> float:
    """max(inter/area_a, inter/area_b) of two boxes taken as continuous xyxy corners (0 for an empty box). The
    reference applies it to the stored inclusive-cell boxes, i.e. without the +1 of their paste rectangles."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return max(inter / area_a if area_a > 0 else 0.0, inter / area_b if area_b > 0 else 0.0)


def relative_position_word(
    index: int, names: Sequence[str], boxes: Sequence, rng: np.random.Generator, threshold: float = 0.75
) -> str | None:
    """Where object `index` is relative to the other objects of its class (None when it has no same-class twin).

    Boxes are inclusive cells in paste order. In the order of the twins: the first one whose `corner_overlap` with
    the object exceeds `threshold` decides by paste order: "before"|"in front" when the object was pasted later (on
    top), else "behind". Otherwise, with exactly two twins and the object's centre strictly between theirs on both
    axes: "middle"|"center". Otherwise the largest signed centre difference per axis (first on ties): horizontal if
    |dx| > |dy| ("left" for dx < 0, else "right"), else vertical ("above"|"top" for dy < 0, else "below").
    A|B: one of the two, uniformly.
    """
    box = boxes[index]
    twins = [j for j, n in enumerate(names) if j != index and n == names[index]]
    if not twins:
        return None
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    centres = []
    for j in twins:
        other = boxes[j]
        if corner_overlap(box, other) > threshold:
            return ("before", "in front")[int(rng.integers(2))] if index > j else "behind"
        centres.append(((other[0] + other[2]) / 2, (other[1] + other[3]) / 2))
    if len(centres) == 2:
        (xa, xb), (ya, yb) = sorted(c[0] for c in centres), sorted(c[1] for c in centres)
        if xa < cx < xb and ya < cy < yb:
            return ("middle", "center")[int(rng.integers(2))]
    dx = max((cx - ox for ox, _ in centres), key=abs)
    dy = max((cy - oy for _, oy in centres), key=abs)
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return ("above", "top")[int(rng.integers(2))] if dy < 0 else "below"


def absolute_position_word(box, grid: int, rng: np.random.Generator) -> str:
    """Where an inclusive cell box lies in the image, from the thirds holding its paste rectangle's centre:
    "middle"|"center" when central on both axes, else "right" / "left" by the horizontal third, else "bottom" /
    "top" by the vertical one."""
    col = min(3 * (box[0] + box[2] + 1) // (2 * grid), 2)  # floor(3 * centre / grid), centre = (x1 + x2 + 1) / 2
    row = min(3 * (box[1] + box[3] + 1) // (2 * grid), 2)
    if col == 1 and row == 1:
        return ("middle", "center")[int(rng.integers(2))]
    if col != 1:
        return "right" if col == 2 else "left"
    return "bottom" if row == 2 else "top"


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1).contiguous()


class SyntheticCompositions(torch.utils.data.Dataset):
    """`length` compositions of one epoch; call `set_epoch` to move on (fresh samples, the object-count switch).
    With `sample_epoch` set, the samples are those of that epoch whatever `set_epoch` says (a fixed validation set),
    while the phase still follows `set_epoch`.

    Items: {"image": (3, S, S) in [0, 1], "phrase", "cells" (4,) long, "all_cells" (k, 4), "reconstruct" bool}.
    """

    def __init__(
        self, composer: Composer, length: int, switch_epoch: int = 40, sample_epoch: int | None = None
    ) -> None:
        self.composer, self.length, self.switch_epoch = composer, length, switch_epoch
        self.sample_epoch = sample_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch`: its samples (unless `sample_epoch` is set) and its phase."""
        self.epoch = epoch

    @property
    def first_phase(self) -> bool:
        """Before the switch: fixed object count and name reconstruction in the text."""
        return self.epoch < self.switch_epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        epoch = self.epoch if self.sample_epoch is None else self.sample_epoch
        comp = self.composer.compose(index, epoch, fixed=self.first_phase)
        return {
            "image": to_tensor(comp.image),
            "phrase": comp.phrase,
            "cells": torch.tensor(comp.boxes[comp.target]),
            "all_cells": torch.tensor(comp.boxes),
            "reconstruct": self.first_phase,
        }


def collate(items: list[dict]) -> dict:
    """Stack images and target cells; keep phrases as a list."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "phrase": [it["phrase"] for it in items],
        "cells": torch.stack([it["cells"] for it in items]),
        "reconstruct": items[0]["reconstruct"],
    }
