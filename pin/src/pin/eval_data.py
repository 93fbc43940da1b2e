"""Zero-shot localisation benchmarks, one item per ground-truth object (queried with its class name).

Images are resized anisotropically to image_size x image_size; boxes are converted into that frame the way the
reference does (int truncation, far edge clipped). Only images with 1..max_objects annotations are kept (crowd and
difficult annotations count).
Layouts:
  pvoc:    <root>/VOC2007/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/test.txt}  (root = VOCdevkit)
  coco:    <root>/annotations/instances_val2017.json, <root>/val2017/*.jpg
  lvis:    <root>/annotations/lvis_v1_val.json, images in <root>/{train2017,val2017} (from each image's coco_url)
  refcoco: <root>/refcoco/{refs(unc).p or refs(unc).json, instances.json}, images in <root>/train2014
"""

from __future__ import annotations

import json
import pickle
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from funai_common.datasets import open_image

from .boxes import coco_box_to_frame, voc_box_to_frame
from .synthetic import SyntheticCompositions, normalise_name, to_tensor


@dataclass
class ObjectQuery:
    """One evaluation query: an image (path or in-memory), the prompt name and the GT xyxy box in the square frame."""

    image: object
    name: str
    box: list[float]
    image_id: str


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}; see the layout in pin.eval_data / README")
    return path


def pvoc_queries(root: str | Path, max_objects: int = 3, image_size: int = 224) -> list[ObjectQuery]:
    """PVOC 2007 test; objects are queried by their annotation names (`diningtable`, `tvmonitor`), as the reference."""
    root = Path(root)
    # <root>/VOC2007 (the documented layout; named when neither exists), or a root that is VOC2007 itself
    base = root if (root / "ImageSets").is_dir() and not (root / "VOC2007").is_dir() else root / "VOC2007"
    ids = _require(base / "ImageSets" / "Main" / "test.txt", "PVOC 2007 test list").read_text().split()
    out = []
    for image_id in ids:
        tree = ET.parse(_require(base / "Annotations" / f"{image_id}.xml", "PVOC annotation"))
        size = tree.find("size")
        w, h = int(size.find("width").text), int(size.find("height").text)
        objects = tree.findall("object")
        if not 1 <= len(objects) <= max_objects:
            continue
        for obj in objects:
            bb = obj.find("bndbox")
            xyxy = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            name = obj.find("name").text.strip()
            out.append(
                ObjectQuery(
                    base / "JPEGImages" / f"{image_id}.jpg",
                    name,
                    voc_box_to_frame(xyxy, w, h, image_size),
                    image_id,
                )
            )
    return out


def _coco_like(ann_file: Path, image_path, max_objects: int, image_size: int, name_fn) -> list[ObjectQuery]:
    with open(ann_file) as f:
        data = json.load(f)
    cats = {c["id"]: name_fn(c["name"]) for c in data["categories"]}
    per_image: dict[int, list] = {}
    for ann in data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for img in data["images"]:
        anns = per_image.get(img["id"], [])
        if not 1 <= len(anns) <= max_objects:
            continue
        for ann in anns:
            box = coco_box_to_frame(ann["bbox"], img["width"], img["height"], image_size)
            out.append(ObjectQuery(image_path(img), cats[ann["category_id"]], box, str(img["id"])))
    return out


def coco_queries(root: str | Path, max_objects: int = 3, image_size: int = 224) -> list[ObjectQuery]:
    """COCO val2017."""
    root = Path(root)
    ann = _require(root / "annotations" / "instances_val2017.json", "COCO val2017 annotations")
    return _coco_like(ann, lambda img: root / "val2017" / img["file_name"], max_objects, image_size, lambda n: n)


def lvis_queries(root: str | Path, max_objects: int = 3, image_size: int = 224) -> list[ObjectQuery]:
    """LVIS v1 val (COCO images)."""
    root = Path(root)
    ann = root / "annotations" / "lvis_v1_val.json"
    ann = _require(ann if ann.exists() else root / "lvis_v1_val.json", "LVIS v1 val annotations")

    def path(img):
        return root.joinpath(*img["coco_url"].split("/")[-2:])

    return _coco_like(ann, path, max_objects, image_size, normalise_name)


class _NoGlobals(pickle.Unpickler):
    """Unpickler for plain data only (dict/list/str/number): refuses every class, so no code can run."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refs file asks for {module}.{name}; only plain data is accepted")


def _expression(sentence: dict) -> str:
    """A RefCOCO sentence as the reference prompts it: the annotator's raw text (`sent` is lower-cased, tokenised)."""
    return sentence["raw"] if "raw" in sentence else sentence["sent"]


def refcoco_queries(root: str | Path, image_size: int = 224, split: str = "testA") -> list[ObjectQuery]:
    """RefCOCO (UNC) testA: the last sentence of each ref is the "object name"."""
    root = Path(root)
    base = root / "refcoco"
    refs_json = base / "refs(unc).json"
    if refs_json.exists():
        refs = json.loads(refs_json.read_text())
    else:
        with open(_require(base / "refs(unc).p", "RefCOCO refs"), "rb") as f:
            refs = _NoGlobals(f, encoding="latin1").load()
    with open(_require(base / "instances.json", "RefCOCO instances")) as f:
        inst = json.load(f)
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    out = []
    for ref in refs:
        if ref["split"] != split:
            continue
        img, ann = images[ref["image_id"]], anns[ref["ann_id"]]
        box = coco_box_to_frame(ann["bbox"], img["width"], img["height"], image_size)
        out.append(
            ObjectQuery(
                root / "train2014" / img["file_name"], _expression(ref["sentences"][-1]), box, str(ref["ref_id"])
            )
        )
    return out


HELD_OUT_EPOCH = 10**6
"""The epoch of the held-out synthetic compositions (pin-eval's and pin-train's validation); never trained on."""


def synthetic_queries(
    dataset: SyntheticCompositions, num_images: int, epoch: int = HELD_OUT_EPOCH, fixed: bool = True
) -> list[ObjectQuery]:
    """Held-out compositions (an epoch never used in training); every object is a query, prompted with its phrase
    (its name, with referral words when they are on, as the reference's validation prompts).

    `fixed` (default): exactly `composer.fixed_objects` objects per image (data.max_objects, 3), as the reference's
    val and zero-shot loaders, which keep `num_objects_fixed` for the whole run (its epoch-40 callback changes only
    the training loader); False: k ~ U{1..max_objects} (the CPU demo's protocol)."""
    out = []
    cell = dataset.composer.sampler.cell
    size = dataset.composer.sampler.image_size
    for i in range(num_images):
        comp = dataset.composer.compose(i, epoch, fixed=fixed)
        for name, b in zip(comp.phrases, comp.boxes):
            box = [b[0] * cell, b[1] * cell, min((b[2] + 1) * cell, size), min((b[3] + 1) * cell, size)]
            out.append(ObjectQuery(comp.image, name, [float(v) for v in box], f"synthetic_{i}"))
    return out


def load_image(query: ObjectQuery, image_size: int = 224) -> torch.Tensor:
    """(3, S, S) float in [0, 1], anisotropic bilinear resize: the reference's torchvision `F.resize(img, (S, S))`
    at its default interpolation (the VLM processors' own resize is then a no-op on the square image)."""
    img = query.image.convert("RGB") if isinstance(query.image, Image.Image) else open_image(query.image)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return to_tensor(img)


class QueryDataset(torch.utils.data.Dataset):
    """Items {"image": (3, S, S) in [0, 1], "name", "box" (4,) GT xyxy in the S x S frame, "index"} of the queries."""

    def __init__(self, queries: list[ObjectQuery], image_size: int = 224) -> None:
        self.queries, self.image_size = queries, image_size

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict:
        q = self.queries[i]
        return {"image": load_image(q, self.image_size), "name": q.name, "box": torch.tensor(q.box), "index": i}


def collate_queries(items: list[dict]) -> dict:
    """Batch `QueryDataset` items: "image" (B, 3, S, S), "box" (B, 4); "name" and "index" as lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "name": [it["name"] for it in items],
        "box": torch.stack([it["box"] for it in items]),
        "index": [it["index"] for it in items],
    }


SYNTHETIC_SETS = ("synthetic", "synthetic_zero_shot")  # built from the config's object pools by pin.eval


def queries_for(name: str, root, max_objects: int, image_size: int) -> list[ObjectQuery]:
    """Object queries of the real eval dataset `name` (pvoc, coco, lvis: images with <= max_objects objects;
    refcoco: testA) read from `root`, boxes in `image_size` pixels."""
    loaders = {"pvoc": pvoc_queries, "coco": coco_queries, "lvis": lvis_queries}
    if name in loaders:
        return loaders[name](root, max_objects, image_size)
    if name == "refcoco":
        return refcoco_queries(root, image_size)
    raise ValueError(f"unknown eval dataset {name!r}; expected one of {(*loaders, 'refcoco', *SYNTHETIC_SETS)}")
