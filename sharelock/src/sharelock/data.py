"""Reference preprocessing and the data sources: webdataset tars, image folders + captions, labelled sets (image
folders, torchvision classes, Hugging Face datasets)."""

from __future__ import annotations

import csv
import glob
import inspect
import io
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from funai_common.datasets import open_image
from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD
from sharelock.config import read_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")
TEXT_EXTENSIONS = ("txt", "caption", "text")


def to_rgb(image: Image.Image) -> Image.Image:
    """Grey, palette and RGBA images as RGB (a no-op on RGB), so that every image gives 3 channels."""
    return image if image.mode == "RGB" else image.convert("RGB")


def eval_transform() -> Callable[[Image.Image], torch.Tensor]:
    """PIL image (any mode, converted to RGB) -> (3, 224, 224) float tensor: Resize(256) on the shorter side (bilinear,
    antialias), CenterCrop(224), ToTensor, ImageNet mean/std. The reference uses this for training features too (no
    augmentation)."""
    return T.Compose(
        [
            to_rgb,
            T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# ------------------------------------------------------------------------------------------- webdataset tars
def expand_urls(pattern: str | Sequence[str]) -> list[str]:
    """Expand `shards/{00000..00012}.tar` brace ranges, comma lists `{a,b}`, `::`-separated lists and globs."""
    if not isinstance(pattern, str):
        return [u for p in pattern for u in expand_urls(p)]
    if "::" in pattern:
        return expand_urls(pattern.split("::"))
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match:
        body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.groups()
            options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            options = body.split(",")
        return [u for opt in options for u in expand_urls(head + opt + tail)]
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise FileNotFoundError(f"no webdataset shard matches {pattern!r} (expected img2dataset .tar shards)")
    return matches


def _split_member(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    prefix = name[: len(name) - len(base)]
    key, _, ext = base.partition(".")
    return prefix + key, ext.lower()


def iter_webdataset(
    urls: str | Sequence[str], images: bool = True, captions: bool = True, skip: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, Image.Image | None, str | None]]:
    """Stream (key, PIL image or None, caption or None) from img2dataset tar shards with the standard library's
    `tarfile` (sequential reads, no extra dependency). Members are grouped by key (`000123.jpg`, `000123.txt`, ...);
    `skip(key)` True skips decoding (used to resume)."""
    for url in expand_urls(urls):
        try:
            tar = tarfile.open(url, mode="r|*")
        except tarfile.ReadError as err:
            raise ValueError(f"webdataset shard {url} is not a readable tar file ({err})") from None
        with tar:
            current, group = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key != current:
                    if current is not None:
                        yield from _emit(current, group, images, captions, skip, url)
                    current, group = key, {}
                wanted = (images and ext in ("jpg", "jpeg", "png", "webp")) or (captions and ext in TEXT_EXTENSIONS)
                if wanted and (skip is None or not skip(key.rsplit("/", 1)[-1])):
                    group[ext] = tar.extractfile(member).read()
            if current is not None:
                yield from _emit(current, group, images, captions, skip, url)


def _emit(key, group, images, captions, skip, url):
    key = key.rsplit("/", 1)[-1]
    if skip is not None and skip(key):
        return
    image = caption = None
    if images:
        raw = next((group[e] for e in ("jpg", "jpeg", "png", "webp") if e in group), None)
        if raw is None:
            return
        image = open_image(io.BytesIO(raw), name=f"{key} in {url}")
    if captions:
        raw = next((group[e] for e in TEXT_EXTENSIONS if e in group), None)
        if raw is None:
            return
        caption = raw.decode("utf-8").strip()
    yield key, image, caption


# ------------------------------------------------------------------------------------ folders + caption files
def read_captions(path: str | Path) -> dict[str, str]:
    """Captions {sample id: caption} from a JSON dict, a JSON list of {"image"/"id", "caption"/"text"} records, or
    a CSV/TSV whose header names an id column (image, filepath, file, id, key, uid) and a caption column (caption,
    text, title)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path} (expected .json or .csv)")
    if path.suffix.lower() == ".json":
        data = read_json(path)
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            raise ValueError(
                f"{path} is a COCO-style annotation file: convert it to {{image file: caption}} JSON or a CSV with "
                "image and caption columns (one caption per image and file)"
            )
        records = (
            data.items()
            if isinstance(data, dict)
            else ((_pick(r, ID_COLS, path), _pick(r, CAP_COLS, path)) for r in data)
        )
        captions = {}
        for k, v in records:
            if isinstance(v, list | tuple | dict):  # str() would encode "['a dog', 'a cat']" as the caption
                raise ValueError(
                    f"{path}: the caption of {k!r} is a {type(v).__name__}, not a string: give one caption per id "
                    "(several captions per image: one caption file per caption, each its own caption store)"
                )
            if v is None:  # str() would encode "None" as the caption
                raise ValueError(f"{path}: the caption of {k!r} is null, expected a string")
            captions[str(k)] = str(v)
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel) is dropped
            rows = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            captions = {}
            for r in rows:
                if None in r or None in r.values():  # csv puts extra fields under None, missing ones are None
                    raise ValueError(
                        f"{path} line {rows.line_num}: {'more' if None in r else 'fewer'} fields than the header "
                        f"{rows.fieldnames} (quote a caption that holds the delimiter)"
                    )
                captions[str(_pick(r, ID_COLS, path))] = str(_pick(r, CAP_COLS, path))
    else:
        raise ValueError(f"unsupported captions file {path}: expected .json, .csv or .tsv")
    if not captions:
        raise ValueError(f"captions file {path} holds no captions")
    return captions


ID_COLS = ("image", "filepath", "file", "id", "key", "uid")
CAP_COLS = ("caption", "text", "title")


def _pick(record: dict, names: Sequence[str], path: Path) -> Any:
    for name in names:
        if name in record:
            return record[name]
    raise KeyError(f"{path}: record {record} has none of the columns {list(names)}")


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images under `root` named by the ids of a captions file; yields (id, transformed image)."""

    def __init__(self, root: str | Path, captions: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.captions = read_captions(captions)
        self.ids = list(self.captions)
        self.transform = transform or eval_transform()

    def path(self, sample_id: str) -> Path:
        """The image file of `sample_id`: `root/<id>` itself, else the first `root/<id><ext>` over IMAGE_EXTENSIONS."""
        direct = self.root / sample_id
        if direct.is_file():
            return direct
        for ext in IMAGE_EXTENSIONS:
            if (self.root / f"{sample_id}{ext}").is_file():
                return self.root / f"{sample_id}{ext}"
        raise FileNotFoundError(
            f"no image for id {sample_id!r} under {self.root} (tried the id and id + {IMAGE_EXTENSIONS})"
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        sample_id = self.ids[i]
        return sample_id, self.transform(open_image(self.path(sample_id)))


# ------------------------------------------------------------------------------------ labelled sets
def load_class_names(
    source: str | Path | Sequence[str], folder_classes: Sequence[str] | None = None, label_column: str = "label"
) -> list[str]:
    """Class names in label order from a list, a .txt (one per line), or JSON: a list, {"0": name, ...},
    {folder name (e.g. WordNet id): name} ordered like `folder_classes`, or Keras' imagenet_class_index.json
    ({"0": [wnid, name], ...}, matched by wnid when `folder_classes` are wnids), or a Hugging Face dataset
    `hf:<name>[:<split>]` (`features[label_column].names` in its label order, as the reference; reordered like
    `folder_classes` when these are the same names in another order). Any language (UTF-8). As in the
    reference, only the first comma-separated synonym is kept ("tench, Tinca tinca" -> "tench"). With (non-empty)
    `folder_classes`, the number of names must equal the number of class folders (ValueError otherwise)."""
    where = source if isinstance(source, str | Path) else "the class-name list"
    if is_hf_spec(source):
        names = hf_class_names(source, label_column)
        if folder_classes and sorted(folder_classes) == sorted(names):
            # the same names in another order (e.g. sorted class folders): follow the labels being scored
            names = list(folder_classes)
    elif isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"class names file not found: {path} (expected .json or .txt)")
        if path.suffix.lower() == ".json":
            data = read_json(path)
            if isinstance(data, dict) and data and all(_is_wnid_pair(v) for v in data.values()):
                pairs, data = data, {wnid: name for wnid, name in data.values()}
                if not (folder_classes and all(c in data for c in folder_classes)):
                    data = {k: v[1] for k, v in pairs.items()}
            if isinstance(data, dict):
                if folder_classes and all(c in data for c in folder_classes):
                    names = [data[c] for c in folder_classes]
                elif all(k.isdigit() for k in data):
                    names = [data[k] for k in sorted(data, key=int)]
                else:
                    raise ValueError(f"{path}: class-name keys must be label ids or the dataset's folder names")
            else:
                names = list(data)
        else:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = list(source)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"{where}: class names must be strings, got e.g. {bad[0]!r}")
    if folder_classes and len(names) != len(folder_classes):
        raise ValueError(
            f"{where} holds {len(names)} class names but the dataset has {len(folder_classes)} class folders "
            f"(e.g. {list(folder_classes)[:3]}): give names keyed by folder name, or one per folder in label order"
        )
    return [n.split(",")[0].strip() for n in names]


def _is_wnid_pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _local_dataset(root: Path, kind: str, split: str) -> torch.utils.data.Dataset:
    """An ImageFolder or a torchvision dataset class (built with root, split/train and download=False)."""
    import torchvision.datasets as tvd

    if not root.exists():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if kind == "imagefolder":
        return tvd.ImageFolder(str(root), loader=open_image)
    cls = getattr(tvd, kind, None)
    if cls is None:
        raise ValueError(
            f"unknown dataset kind {kind!r}: use 'imagefolder', a torchvision dataset class name, or an hf: path"
        )
    params = inspect.signature(cls).parameters
    kwargs = {"download": False} if "download" in params else {}
    if "split" in params:
        kwargs["split"] = split
    elif "train" in params:
        kwargs["train"] = split == "train"
    try:
        return cls(str(root), **kwargs)
    except RuntimeError as err:  # torchvision: "Dataset not found ... use download=True"
        raise FileNotFoundError(f"torchvision {kind} not found under {root} (never downloaded here): {err}") from None


class LabelledImages(torch.utils.data.Dataset):
    """A classification set yielding (id, transformed image, label): `kind="imagefolder"` (root/<class>/<image>), a
    torchvision dataset class name (`kind="CIFAR10"`, ...; built with root, split/train and download=False), or, for
    a root `hf:<name>[:<split>]` (any kind), a Hugging Face dataset split (`HFImageClassification`; the split in the
    spec wins over `split`). Ids are the row indices as strings."""

    def __init__(
        self,
        root: str | Path,
        kind: str = "imagefolder",
        split: str = "val",
        transform: Callable | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        self.transform = transform or eval_transform()
        if is_hf_spec(root):
            self.dataset = HFImageClassification(str(root), split, image_column, label_column)
        else:
            self.dataset = _local_dataset(Path(root), kind, split)
        # folder names where the dataset has them (torchvision ImageNet: wnids; its .classes are name tuples)
        classes = getattr(self.dataset, "wnids", None) or getattr(self.dataset, "classes", [])
        self.classes = [c if isinstance(c, str) else str(c[0]) for c in classes]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, int]:
        image, label = self.dataset[i]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        return str(i), self.transform(image.convert("RGB")), int(label)


# ------------------------------------------------------------------------------------ Hugging Face datasets
HF_PREFIX = "hf:"
HF_INSTALL_HINT = "pip install 'funai-sharelock[hf]'"


def is_hf_spec(source: Any) -> bool:
    """Whether a dataset argument names a Hugging Face dataset (`hf:<name>[:<split>]`)."""
    return isinstance(source, str) and source.startswith(HF_PREFIX)


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """`hf:<name>[:<split>]` -> (name, split or None). The split is what follows the last colon, so `<name>` may be
    a Hub id (`ILSVRC/imagenet-1k`), a `save_to_disk` folder or a folder of images (`/data/val:train`)."""
    body = spec[len(HF_PREFIX) :] if is_hf_spec(spec) else spec
    name, colon, split = body.rpartition(":")
    if not colon:
        name, split = body, None
    if not name or (colon and not split):
        raise ValueError(f"bad Hugging Face dataset {spec!r}: expected hf:<name>[:<split>]")
    return name, split


def import_datasets():
    """The optional `datasets` package, or an ImportError saying how to install it."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"Hugging Face datasets (hf:<name>[:<split>]) need the optional `datasets` package: {HF_INSTALL_HINT}"
        ) from err
    return datasets


def load_hf_split(spec: str, split: str | None = None):
    """The `datasets.Dataset` named by `hf:<name>[:<split>]` (the spec's split wins over `split`; with neither, the
    first split). A folder written by `save_to_disk` is read with `load_from_disk` (a saved single `Dataset` has no
    splits: any split is accepted); any other folder or a Hub id goes through `load_dataset(name, split=split)`, so a
    folder of `[split/]class/image` files is read as `imagefolder` and `HF_DATASETS_OFFLINE=1` uses the local cache.
    Missing datasets raise FileNotFoundError and missing splits ValueError, both naming the value."""
    datasets = import_datasets()
    name, given = parse_hf_spec(spec)
    split = given or split
    path = Path(name).expanduser()
    if not path.exists() and name.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"Hugging Face dataset folder not found: {path} (from {spec!r})")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        data = datasets.load_from_disk(str(path))
        if not isinstance(data, datasets.DatasetDict):
            return data
        if split is None:
            split = next(iter(data))
        if split not in data:
            raise ValueError(f"split {split!r} not in Hugging Face dataset {str(path)!r} (splits: {list(data)})")
        return data[split]
    try:
        data = datasets.load_dataset(str(path) if path.is_dir() else name, split=split)
    except ValueError as err:
        if "unknown split" not in str(err).lower():
            raise
        raise ValueError(f"split {split!r} not in Hugging Face dataset {name!r}: {err}") from None
    except (FileNotFoundError, ConnectionError) as err:  # incl. DatasetNotFoundError and OfflineModeIsEnabled
        cfg = datasets.config
        is_offline = getattr(cfg, "HF_HUB_OFFLINE", False) or getattr(cfg, "HF_DATASETS_OFFLINE", False)
        offline = " (offline: it must be in the local Hugging Face cache)" if is_offline else ""
        raise FileNotFoundError(f"Hugging Face dataset {name!r} not found{offline}: {err}") from None
    return data[next(iter(data))] if isinstance(data, datasets.DatasetDict) else data


def hf_label_names(features, label_column: str, spec: str) -> list[str] | None:
    """`features[label_column].names` of a dataset's `datasets.Features` (None when the column is not a
    `ClassLabel`)."""
    datasets = import_datasets()
    if label_column not in features:
        raise ValueError(
            f"Hugging Face dataset {spec!r} has no label column {label_column!r} (columns: {list(features)}): "
            "set label_column"
        )
    feature = features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def hf_class_names(spec: str, label_column: str = "label") -> list[str]:
    """Class names of `hf:<name>[:<split>]` in label order: the reference's `features["label"].names`. For a Hub id
    they come from the dataset's metadata (`load_dataset_builder(...).info.features`), without downloading its
    images; a local folder, or a Hub dataset whose metadata lists no features, is loaded."""
    name, _ = parse_hf_spec(spec)
    names = None
    if not Path(name).expanduser().exists():
        try:
            features = import_datasets().load_dataset_builder(name).info.features
        except (FileNotFoundError, ConnectionError):  # not found / offline: load_hf_split names the problem
            features = None
        if features is not None:
            names = hf_label_names(features, label_column, spec)
    if names is None:
        names = hf_label_names(load_hf_split(spec).features, label_column, spec)
    if names is None:
        raise ValueError(
            f"column {label_column!r} of Hugging Face dataset {spec!r} is not a ClassLabel and holds no class names: "
            "give the names as a file"
        )
    return names


class HFImageClassification(torch.utils.data.Dataset):
    """(PIL image, label) rows of a Hugging Face image-classification split in row order; `.classes` are the
    `ClassLabel` names of the label column (empty for plain integer labels)."""

    def __init__(
        self, spec: str, split: str | None = None, image_column: str = "image", label_column: str = "label"
    ) -> None:
        data = load_hf_split(spec, split)
        names = hf_label_names(data.features, label_column, spec)
        if image_column not in data.column_names:
            raise ValueError(
                f"Hugging Face dataset {spec!r} has no image column {image_column!r} (columns: {data.column_names}): "
                "set image_column"
            )
        self.data = data.select_columns([image_column, label_column])  # other columns are never decoded
        self.image_column, self.label_column = image_column, label_column
        self.classes = names or []
        labels = self.data[label_column]
        if len(self.data) and min(labels) < 0:
            raise ValueError(f"Hugging Face dataset {spec!r} has unlabelled rows (label -1): use a labelled split")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        row = self.data[i]
        return row[self.image_column], row[self.label_column]
