"""Evaluation datasets (FSC-147, CARPK, MSO) and the reference's test-time preprocessing."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from counting.collage import normalize
from counting.density import dot_density_map
from counting.pools import load_rgb
from counting.resize import resize_image

log = logging.getLogger("counting")


def test_size(height: int, width: int, patch_size: int, target_height: int = 384, fixed: bool = False):
    """Test size (height, width): ``target_height`` x P * floor(W / H * target_height / P), or square if fixed."""
    if fixed:
        return target_height, target_height
    return target_height, max(patch_size * int(width / height * target_height / patch_size), patch_size)


def prepare_test_image(
    image: torch.Tensor,
    boxes: torch.Tensor,
    patch_size: int = 16,
    target_height: int = 384,
    fixed: bool = False,
    exemplar_size: int = 64,
    antialias: bool = True,
) -> dict[str, torch.Tensor]:
    """Resize a (3, H, W) image in [0, 1] for testing and cut its exemplars.

    The image is resized bilinearly, by default *with* antialias (what PIL's bilinear resize, used by the reference
    for FSC-147, does; ``antialias=False`` for a tensor resize as the reference's MSO loader), and
    ImageNet-normalised. ``boxes`` (k, 4) xyxy in original pixels are scaled and truncated to rects
    [y1, x1, y2, x2]; exemplar i is rows y1..y2, columns x1..x2 (inclusive) of the normalised image, resized to
    ``exemplar_size`` squared without antialias. Returns image (3, H', W'), rects (k, 4) long, exemplars
    (k, 3, e, e) and relative boxes (k, 4) in [0, 1] (xyxy).
    """
    _, height, width = image.shape
    new_h, new_w = test_size(height, width, patch_size, target_height, fixed)
    resized = normalize(resize_image(image, (new_h, new_w), antialias=antialias))
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    if not len(boxes):
        raise ValueError("no exemplar boxes: counting needs at least one (x1, y1, x2, y2) box per image")
    sx, sy = new_w / width, new_h / height
    rects = torch.stack(
        [(boxes[:, 1] * sy).long(), (boxes[:, 0] * sx).long(), (boxes[:, 3] * sy).long(), (boxes[:, 2] * sx).long()],
        dim=1,
    )
    rects[:, 0::2] = rects[:, 0::2].clamp(0, new_h - 1)
    rects[:, 1::2] = rects[:, 1::2].clamp(0, new_w - 1)
    exemplars = torch.stack(
        [
            resize_image(resized[:, y1 : y2 + 1, x1 : x2 + 1], (exemplar_size, exemplar_size))
            for y1, x1, y2, x2 in rects.tolist()
        ]
    )
    rel = torch.stack([boxes[:, 0] / width, boxes[:, 1] / height, boxes[:, 2] / width, boxes[:, 3] / height], 1)
    return {"image": resized, "rects": rects, "exemplars": exemplars, "rel_boxes": rel.float()}


def read_json(path: Path):
    """The content of a JSON file; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def centres(boxes: np.ndarray) -> np.ndarray:
    """(n, 2) xy centres of (n, >= 4) xyxy boxes."""
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


class CountingTestSet(Dataset):
    """Base: subclasses fill ``self.items`` with (image path, (k,4) xyxy exemplar boxes, gt count, name, (n,2) xy
    object points in original pixels: FSC-147's annotated dots, box centres for CARPK and MSO)."""

    antialias = True  # test-image resize (PIL-like); MSO's reference loader resizes a tensor without antialias

    def __init__(self, patch_size: int = 16, target_height: int = 384, fixed: bool = False, shots: int = 3):
        self.patch_size, self.target_height, self.fixed, self.shots = patch_size, target_height, fixed, shots
        self.items: list[tuple[Path, np.ndarray, float, str, np.ndarray]] = []

    def check_images(self, listing: Path) -> None:
        """Raise FileNotFoundError naming the first listed images that are not on disk (and how many are missing)."""
        missing = [str(path) for path, *_ in self.items if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(self.items)} images listed in {listing} are missing on disk, "
                f"e.g. {missing[:3]}"
            )

    def check_boxes(self, boxes: np.ndarray, name: str, source: Path) -> None:
        """Raise ValueError naming the image and its annotation file when an exemplar box it uses is inverted."""
        used = boxes[: self.shots]
        if ((used[:, 2] < used[:, 0]) | (used[:, 3] < used[:, 1])).any():
            raise ValueError(
                f"{source}: exemplar boxes of {name} {used.tolist()} are inverted; expected x1 <= x2 and y1 <= y2"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, boxes, count, name, points = self.items[index]
        image = load_rgb(path)
        height, width = image.shape[-2:]
        used = boxes[: self.shots]
        outside = (used[:, 0] >= width) | (used[:, 1] >= height) | (used[:, 2] <= 0) | (used[:, 3] <= 0)
        if outside.any():
            raise ValueError(
                f"exemplar boxes {used[outside].tolist()} of {path} lie outside its {width}x{height} pixels "
                "(expected x1, y1, x2, y2 in the image's own pixels)"
            )
        out = prepare_test_image(
            image,
            torch.as_tensor(used),
            self.patch_size,
            self.target_height,
            self.fixed,
            antialias=self.antialias,
        )
        new_h, new_w = out["image"].shape[-2:]
        gt_density = dot_density_map(points, new_h, new_w, (new_w / width, new_h / height))
        out["points"] = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2) * torch.tensor(
            [new_w / width, new_h / height]
        )  # object points (x, y) in the resized image's pixels
        out.update(count=float(count), name=name, gt_density=gt_density)
        return out


class FSC147(CountingTestSet):
    """FSC-147: ``<root>/{annotation_FSC147_384.json, Train_Test_Val_FSC_147.json, images_384_VarV2/*.jpg}``.

    Exemplar boxes come from ``box_examples_coordinates`` (4 corners; corner 0 top-left, corner 2 bottom-right);
    the ground-truth count is the number of annotated points.
    """

    def __init__(self, root: str | Path, split: str = "test", **kwargs):
        super().__init__(**kwargs)
        root = Path(root)
        annotation, splits = root / "annotation_FSC147_384.json", root / "Train_Test_Val_FSC_147.json"
        for path in (annotation, splits, root / "images_384_VarV2"):
            if not path.exists():
                raise FileNotFoundError(
                    f"FSC-147 file {path} missing; expected <root>/annotation_FSC147_384.json, "
                    "Train_Test_Val_FSC_147.json and images_384_VarV2/"
                )
        names, annotations = read_json(splits), read_json(annotation)
        if not isinstance(names, dict) or not all(isinstance(v, list) for v in names.values()):
            raise ValueError(f"{splits}: expected a mapping of split names to lists of image names")
        if split not in names:
            raise ValueError(f"unknown FSC-147 split {split!r}; expected one of {sorted(names)}")
        if not isinstance(annotations, dict):
            raise ValueError(f"{annotation}: expected a mapping of image names to annotations")
        missing = [name for name in names[split] if name not in annotations]
        if missing:
            raise ValueError(
                f"{len(missing)} images of FSC-147 split {split!r} in {splits} have no entry in {annotation}: "
                f"{missing[:5]}"
            )
        for name in names[split]:
            ann = annotations[name]
            for key in ("box_examples_coordinates", "points"):
                if key not in ann:
                    raise KeyError(f"{annotation}: the entry of {name} lacks {key!r}")
            corners = np.asarray(ann["box_examples_coordinates"], dtype=np.float64)
            if corners.ndim != 3 or corners.shape[0] < 1 or corners.shape[1:] != (4, 2):
                raise ValueError(
                    f"{annotation}: box_examples_coordinates of {name} has shape {corners.shape}; expected (k, 4, 2), "
                    "k >= 1 boxes of 4 [x, y] corners (top-left first, bottom-right third)"
                )
            boxes = np.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 2, 0], corners[:, 2, 1]], axis=1)
            self.check_boxes(boxes, name, annotation)
            points = np.asarray(ann["points"], dtype=np.float64).reshape(-1, 2)
            self.items.append((root / "images_384_VarV2" / name, boxes, float(len(points)), name, points))
        self.check_images(splits)


class CARPK(CountingTestSet):
    """CARPK: ``<root>/{Images/*.png, Annotations/*.txt ("x1 y1 x2 y2 cls" per car), ImageSets/<split>.txt}``.

    Images and exemplars as the reference's baseline evaluator (its only CARPK path): square 384 x 384 resize, the
    first 3 annotated cars as exemplars; counted with the same protocol as FSC-147 (windows, tiling, normalisation).
    Images with an empty annotation file have no exemplars to count with: they are skipped (logged), as MSO's.
    Resized without antialias: the reference's CARPK transform is ToTensor then Resize, a tensor resize (torchvision
    0.14 did not antialias tensors), as for MSO.
    """

    antialias = False

    def __init__(self, root: str | Path, split: str = "test", **kwargs):
        kwargs.setdefault("fixed", True)
        super().__init__(**kwargs)
        root = Path(root)
        listing = root / "ImageSets" / f"{split}.txt"
        if not listing.is_file():
            lists = sorted(p.stem for p in listing.parent.glob("*.txt"))
            raise FileNotFoundError(
                f"CARPK list {listing} missing (split {split!r}; lists found: {lists}); "
                "expected <root>/ImageSets/<split>.txt, Images, Annotations"
            )
        skipped = []
        for name in listing.read_text().split():
            file = root / "Annotations" / f"{name}.txt"
            text = file.read_text()
            if not text.strip():
                skipped.append(name)
                continue
            try:
                rows = np.loadtxt(io.StringIO(text), ndmin=2)
            except ValueError as err:
                raise ValueError(f"{file}: {err}; expected rows 'x1 y1 x2 y2 cls'") from None
            if rows.shape[1] < 4:
                raise ValueError(f"{file}: rows of {rows.shape[1]} numbers; expected rows 'x1 y1 x2 y2 cls'")
            self.check_boxes(rows[:, :4], name, file)
            self.items.append((root / "Images" / f"{name}.png", rows[:, :4], float(len(rows)), name, centres(rows)))
        self.check_images(listing)
        if skipped:
            log.warning(
                "CARPK %s: skipped %d images without annotated cars (no exemplars): %s",
                split,
                len(skipped),
                skipped[:5],
            )


def mso_boxes(anno) -> np.ndarray:
    """(n, 4) float64 boxes of one MSO annotation; an empty MATLAB matrix (None, or its size-2 dims array) -> (0, 4)."""
    boxes = np.zeros(0) if anno is None else np.asarray(anno, dtype=np.float64)
    return boxes.reshape(-1, 4) if boxes.size >= 4 else np.zeros((0, 4))


def read_mso_index(path: Path) -> list[tuple[str, np.ndarray]]:
    """(file name, (n, 4) xyxy boxes) per image of MSO's ``imgIdx.mat`` (MATLAB v7.3 = HDF5; needs mat73 or h5py).

    Images without objects get (0, 4) boxes.
    """
    try:
        import mat73

        index = mat73.loadmat(str(path))["imgIdx"]
        return [(str(n), mso_boxes(a)) for n, a in zip(index["name"], index["anno"])]
    except ImportError:
        pass
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading MSO's imgIdx.mat needs `pip install mat73` (or h5py)") from err
    with h5py.File(path, "r") as f:
        group = f["imgIdx"]
        names = ["".join(chr(int(c)) for c in np.asarray(f[ref]).reshape(-1)) for ref in group["name"][:, 0]]
        annos = [
            None if f[ref].attrs.get("MATLAB_empty", 0) else np.asarray(f[ref], dtype=np.float64).T
            for ref in group["anno"][:, 0]
        ]
    return [(name, mso_boxes(a)) for name, a in zip(names, annos)]


class MSO(CountingTestSet):
    """MSO (salient object subitising): ``<root>/{imgIdx.mat, img/*.jpg}``; 1 shot, 384 x 384, images with >= 1 box.

    Resized without antialias: the reference's MSO transform is ToTensor then Resize, a tensor resize (torchvision
    0.14 did not antialias tensors)."""

    antialias = False

    def __init__(self, root: str | Path, **kwargs):
        kwargs.setdefault("fixed", True)
        kwargs.setdefault("shots", 1)
        super().__init__(**kwargs)
        root = Path(root)
        index = root / "imgIdx.mat"
        if not index.is_file():
            raise FileNotFoundError(f"MSO index {index} missing; expected <root>/imgIdx.mat and <root>/img/")
        for name, boxes in read_mso_index(index):
            if len(boxes):
                self.check_boxes(boxes, name, index)
                self.items.append((root / "img" / name, boxes, float(len(boxes)), name, centres(boxes)))
        self.check_images(index)


def build_test_set(name: str, root: str | Path, split: str = "test", **kwargs) -> CountingTestSet:
    """``fsc147`` (split val/test), ``carpk`` or ``mso``."""
    name = name.lower().replace("-", "")
    if name == "fsc147":
        return FSC147(root, split, **kwargs)
    if name == "carpk":
        return CARPK(root, split, **kwargs)
    if name == "mso":
        return MSO(root, **kwargs)
    raise ValueError(f"unknown test set {name!r}; expected fsc147, carpk or mso")
