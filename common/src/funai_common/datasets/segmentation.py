"""Semantic segmentation datasets in the layouts used by Hummingbird, NeCo, Leopart and TimeT.

Each dataset yields (PIL RGB image, PIL "L" mask of class ids) unless ``transforms(image, mask)`` is given.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from funai_common.datasets.coco_categories import STUFF_SUPERCATEGORY, THING_SUPERCATEGORY

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
# Cityscapes labelIds of the 19 evaluated classes, in trainId order; every other id becomes 255.
CITYSCAPES_EVAL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def require(path: Path, layout: str) -> Path:
    """Return ``path`` if it exists, else raise FileNotFoundError naming it and the expected layout."""
    if not path.exists():
        raise FileNotFoundError(f"expected {path} (layout: {layout})")
    return path


def open_image(source, mode: str | None = "RGB", name: str | None = None) -> Image.Image:
    """The image at ``source`` (a path or a file object, called ``name`` in errors), decoded now and converted to
    ``mode``; a file that is not a readable image (corrupt, truncated, another format) is a ValueError naming it,
    instead of PIL's error deep inside a data loader (a missing file stays a FileNotFoundError)."""
    try:
        image = Image.open(source)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{name or source} is not a readable image ({err}); remove or replace the file") from None
    return image.convert(mode) if mode else image


def lookup_table(mapping: dict[int, int], default: int = 255) -> np.ndarray:
    """A 256-entry uint8 table mapping raw mask values to class ids (``default`` elsewhere)."""
    table = np.full(256, default, dtype=np.uint8)
    for raw, cls in mapping.items():
        table[raw] = cls
    return table


class SegmentationDataset(Dataset):
    """Pairs of image and mask files; ``table`` optionally remaps raw mask values."""

    num_classes: int
    ignore_index: int = 255
    class_names: tuple[str, ...] = ()
    layout: str = ""

    def __init__(
        self, pairs: list[tuple[Path, Path]], transforms=None, table: np.ndarray | None = None, searched: str = ""
    ):
        if not pairs:
            raise FileNotFoundError(f"no image/mask pairs found in {searched} (layout: {self.layout})")
        missing = [f for pair in pairs for f in pair if not f.is_file()]
        if missing:  # found now, not after the memory of an evaluation has been built
            raise FileNotFoundError(
                f"{len(missing)} image/mask files of {len(pairs)} pairs are missing, "
                f"e.g. {[str(m) for m in missing[:3]]}"
            )
        self.pairs, self.transforms, self.table = pairs, transforms, table

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        image_path, mask_path = self.pairs[i]
        image = open_image(image_path)
        mask = np.array(open_image(mask_path, mode=None))
        if mask.ndim != 2:
            raise ValueError(
                f"mask {mask_path} has shape {mask.shape}: expected a single-channel PNG of class ids, not colours"
            )
        if self.table is not None:
            mask = self.table[mask]
        mask = Image.fromarray(mask.astype(np.uint8), mode="L")
        return self.transforms(image, mask) if self.transforms else (image, mask)


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC 2012 in the Hummingbird/NeCo layout (root points inside ``VOCSegmentation``).

    splits "trainaug" and "train" read SegmentationClassAug (10,582 SBD-augmented masks, which include the 1,464
    train images; the reference reads it for both), other splits (val) SegmentationClass.
    21 classes including background 0; 255 marks object boundaries.
    """

    num_classes, class_names = 21, VOC_CLASSES
    layout = "VOCSegmentation/{images/*.jpg, SegmentationClass/*.png, SegmentationClassAug/*.png, sets/<split>.txt}"

    def __init__(self, root, split: str = "val", transforms=None):
        root = require(Path(root), self.layout)
        ids = require(root / "sets" / f"{split}.txt", self.layout).read_text().split()
        mask_dir = root / ("SegmentationClassAug" if split in ("trainaug", "train") else "SegmentationClass")
        require(mask_dir, self.layout)
        pairs = [(root / "images" / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids]
        super().__init__(pairs, transforms, searched=str(root / "sets" / f"{split}.txt"))


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing (ADEChallengeData2016): 151 classes, 0 = "other" is the ignore index (Hummingbird)."""

    num_classes, ignore_index = 151, 0
    layout = "ADEChallengeData2016/{images,annotations}/{training,validation}/*.{jpg,png}"

    def __init__(self, root, split: str = "val", transforms=None):
        root = require(Path(root), self.layout)
        folder = {"train": "training", "val": "validation"}.get(split, split)
        images = sorted(require(root / "images" / folder, self.layout).glob("*.jpg"))
        masks = require(root / "annotations" / folder, self.layout)
        super().__init__(
            [(p, masks / f"{p.stem}.png") for p in images], transforms, searched=f"{root}/images/{folder}/*.jpg"
        )


class Cityscapes(SegmentationDataset):
    """Cityscapes gtFine, labelIds mapped to the 19 trainIds (everything else 255)."""

    num_classes, class_names = 19, CITYSCAPES_CLASSES
    layout = "cityscapes/{leftImg8bit,gtFine}/<split>/<city>/*_{leftImg8bit,gtFine_labelIds}.png"

    def __init__(self, root, split: str = "val", transforms=None):
        root = require(Path(root), self.layout)
        images = sorted(require(root / "leftImg8bit" / split, self.layout).glob("*/*_leftImg8bit.png"))
        gt = require(root / "gtFine" / split, self.layout)
        pairs = [(p, gt / p.parent.name / p.name.replace("_leftImg8bit", "_gtFine_labelIds")) for p in images]
        table = lookup_table({raw: i for i, raw in enumerate(CITYSCAPES_EVAL_IDS)})
        super().__init__(pairs, transforms, table, searched=f"{root}/leftImg8bit/{split}/*/*_leftImg8bit.png")


def _supercategory_table(categories: dict[int, str]) -> tuple[np.ndarray, tuple[str, ...]]:
    names = tuple(sorted(set(categories.values()) - {"other"}))
    return lookup_table({cid: names.index(sc) for cid, sc in categories.items() if sc in names}), names


def _categories_from_json(path: Path, fallback: dict[int, str]) -> dict[int, str]:
    if not path.exists():
        return fallback
    cats = json.loads(path.read_text())["categories"]
    return {c["id"]: c["supercategory"] for c in cats if c["id"] in fallback}


class COCOStuff(SegmentationDataset):
    """COCO-Stuff pixel maps mapped to the 15 stuff supercategories (sorted, "other" removed); things -> 255."""

    num_classes = 15
    layout = "coco/{images/<split>2017/*.jpg, annotations/stuff_annotations/stuff_<split>2017_pixelmaps/*.png}"

    def __init__(self, root, split: str = "val", transforms=None):
        root = require(Path(root), self.layout)
        ann = root / "annotations" / "stuff_annotations"
        masks = require(ann / f"stuff_{split}2017_pixelmaps", self.layout)
        # categories from the small val json (the same 92 stuff classes as train's ~1 GB one), else the built-in table
        categories = _categories_from_json(ann / "stuff_val2017.json", STUFF_SUPERCATEGORY)
        table, self.class_names = _supercategory_table(categories)
        images = sorted(require(root / "images" / f"{split}2017", self.layout).glob("*.jpg"))
        pairs = [(p, masks / f"{p.stem}.png") for p in images]
        super().__init__(pairs, transforms, table, searched=f"{root}/images/{split}2017/*.jpg")


class COCOThings(SegmentationDataset):
    """COCO-Things: panoptic-derived semantic PNGs mapped to the 12 thing supercategories (sorted); rest -> 255."""

    num_classes = 12
    layout = "coco/{images/<split>2017/*.jpg, annotations/<split>2017/*.png (category ids)}"

    def __init__(self, root, split: str = "val", transforms=None):
        root = require(Path(root), self.layout)
        masks = require(root / "annotations" / f"{split}2017", self.layout)
        categories = _categories_from_json(root / "annotations" / "panoptic_val2017.json", THING_SUPERCATEGORY)
        table, self.class_names = _supercategory_table(categories)
        images = sorted(require(root / "images" / f"{split}2017", self.layout).glob("*.jpg"))
        pairs = [(p, masks / f"{p.stem}.png") for p in images]
        super().__init__(pairs, transforms, table, searched=f"{root}/images/{split}2017/*.jpg")


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_file_set(path: str | Path) -> list[str]:
    """Image ids of a file set, one per line, as open-hummingbird-eval's ``file_sets/`` (e.g.
    ``voc/1_div_8/trainaug_8_42.txt``, the data-efficiency subsets); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file set {path} not found (expected a text file with one image id per line)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _image_id(name: str) -> str:
    """Image file name without extension (and without Cityscapes' ``_leftImg8bit``): the id file sets list."""
    if name.lower().endswith(_IMAGE_SUFFIXES):
        name = name.rsplit(".", 1)[0]
    return name.removesuffix("_leftImg8bit")


def subset(
    dataset: SegmentationDataset, file_set=None, fraction: float | None = None, seed: int = 0
) -> SegmentationDataset:
    """A copy of ``dataset`` restricted to the images of ``file_set`` (a file-set path or a list of ids: file names
    without extension) and then to a random ``fraction`` of them: the first int(n * fraction) of a permutation
    seeded by ``seed`` (the reference's ``voc*0.2`` shuffles unseeded). Images keep the dataset's order."""
    if not hasattr(dataset, "pairs"):
        raise ValueError(f"{type(dataset).__name__} has no image files to select from (file sets need a dataset root)")
    pairs = list(dataset.pairs)
    if file_set is not None:
        ids = read_file_set(file_set) if isinstance(file_set, (str, Path)) else [str(i) for i in file_set]
        source = f"file set {file_set}; " if isinstance(file_set, (str, Path)) else ""
        if not ids:  # an empty dataset would only fail later, inside the evaluator, without naming the file
            raise ValueError(f"the file set lists no image ids ({source}expected one image id per line)")
        wanted = {_image_id(i) for i in ids}
        present = {_image_id(image.name) for image, _ in pairs}
        missing = sorted(wanted - present)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} ids of the file set are not images of the dataset, e.g. {missing[:3]} "
                f"({source}the dataset split holds {len(pairs)} images; layout: {dataset.layout})"
            )
        pairs = [pair for pair in pairs if _image_id(pair[0].name) in wanted]
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        count = int(len(pairs) * fraction)
        if count == 0:
            raise ValueError(f"fraction {fraction} of {len(pairs)} images keeps none")
        keep = np.sort(np.random.default_rng(seed).permutation(len(pairs))[:count])
        pairs = [pairs[i] for i in keep]
    out = copy.copy(dataset)
    out.pairs = pairs
    return out
