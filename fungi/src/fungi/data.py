"""Datasets for extraction: ImageFolder, torchvision datasets by name, text and audio file lists, scikit-learn digits,
revisited Oxford 5k / Paris 6k (retrieval).

Image datasets yield (PIL image, label) (the extractor applies the model's inference transform) or, for digits,
(normalised tensor, label). Text lists yield (str, label); audio lists yield (spectrogram (T, F), label). The
retrieval sets yield (PIL image, index into the ground truth's image or query list).
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD

SPLITS = ("train", "val", "test")
# torchvision datasets shipping a validation split of their own, read as split="val" (those the reference's dataset
# factories load for DatasetSplit.VALID; every other one of its datasets asserts it has none)
TORCHVISION_VAL_SPLITS = ("DTD", "Flowers102", "FGVCAircraft")
REVISITED = ("roxford5k", "rparis6k")
RETRIEVAL_SPLITS = ("database", "queries")


class TensorPairs(Dataset):
    """(input, label) pairs from two sequences."""

    def __init__(self, inputs, labels):
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs, self.labels = inputs, [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i]


def digits_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real 8x8 digits, bilinearly upsampled to (N, 3, size, size), ImageNet-normalised."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std, torch.as_tensor(digits.target, dtype=torch.long)


def digits_split(size: int = 32, train_per_class: int | None = None, seed: int = 0, test_fraction: float = 0.5):
    """Stratified, seeded train/test split of the digits -> (train dataset, test dataset)."""
    x, y = digits_images(size)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:][:train_per_class] if train_per_class else idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    tr, te = tr[torch.randperm(len(tr), generator=gen)], te[torch.randperm(len(te), generator=gen)]
    return TensorPairs(list(x[tr]), y[tr].tolist()), TensorPairs(list(x[te]), y[te].tolist())


def read_table(path: str | Path) -> list[tuple[str, str]]:
    """Rows ``input<TAB>label`` of a file list; quotes are plain characters.

    A header line is skipped: first column 'text', 'path' or 'input', or second column 'label' (GLUE-style).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file list {path} does not exist (expected lines 'text-or-path<TAB>label')")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    if rows and (
        rows[0][0].strip().lower() in ("text", "path", "input")
        or (len(rows[0]) > 1 and rows[0][1].strip().lower() == "label")
    ):
        rows = rows[1:]
    bad = [i for i, r in enumerate(rows) if len(r) < 2]
    if bad:
        raise ValueError(f"{path}: line {bad[0] + 1} has no label column (expected 'input<TAB>label')")
    return [(r[0], r[1]) for r in rows]


def label_ids(labels: list[str], classes: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Map string labels to ids (integer strings keep their value; others sorted alphabetically)."""
    if classes is None:
        uniq = sorted(set(labels))
        classes = sorted(uniq, key=int) if all(s.lstrip("-").isdigit() for s in uniq) else uniq
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(lookup))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in the training classes")
    return [lookup[s] for s in labels], classes


def wave_to_float(wave: np.ndarray) -> np.ndarray:
    """Samples (N,) or (N, C) as float32 in [-1, 1): integers divided by their dtype's half range (int16 by 32768,
    int32 by 2**31, uint8 centred at 128 then divided by 128), whatever their peak; floats unchanged."""
    if np.issubdtype(wave.dtype, np.integer):
        info = np.iinfo(wave.dtype)
        half = (int(info.max) - int(info.min) + 1) / 2
        centre = (int(info.max) + int(info.min) + 1) / 2
        return ((wave.astype(np.float64) - centre) / half).astype(np.float32)
    return wave.astype(np.float32)


def load_spectrogram(path: str | Path, num_mel_bins: int = 128, max_length: int = 1024) -> torch.Tensor:
    """AST input (T, F) of a .wav file: Kaldi fbank through transformers' ASTFeatureExtractor (16 kHz mono)."""
    from scipy.io import wavfile
    from transformers import ASTFeatureExtractor

    rate, wave = wavfile.read(str(path))
    wave = wave_to_float(wave)
    if wave.ndim > 1:
        wave = wave.mean(1)
    if rate != 16000:
        raise ValueError(f"{path}: sampling rate {rate} Hz, AST expects 16000 Hz (resample first)")
    fe = ASTFeatureExtractor(num_mel_bins=num_mel_bins, max_length=max_length)
    return torch.as_tensor(fe(wave, sampling_rate=16000, return_tensors="np")["input_values"][0])


def torchvision_class(name: str):
    """(torchvision dataset class, its constructor's parameters) by class name; ValueError for an unknown name."""
    import inspect

    import torchvision

    if not hasattr(torchvision.datasets, name):
        raise ValueError(f"torchvision has no dataset {name!r}")
    cls = getattr(torchvision.datasets, name)
    return cls, inspect.signature(cls).parameters


def torchvision_dataset(name: str, root: str, split: str):
    """torchvision dataset by class name (``CIFAR10``, ``Flowers102``, ``DTD``...) without download: ``split=`` is
    passed to datasets that take it, ``train=(split == 'train')`` to those that take ``train``."""
    cls, params = torchvision_class(name)
    if "split" in params:
        kwargs = {"split": split}
    elif "train" in params:
        kwargs = {"train": split == "train"}
    else:
        raise ValueError(
            f"torchvision dataset {name!r} has no train/test split (it takes neither split= nor train=); write the "
            f"split as class folders under data.root and use data.kind=imagefolder (data.train_split, data.test_split)"
        )
    try:
        return cls(root, **kwargs)
    except RuntimeError as err:
        if "download=True" not in str(err):
            raise
        raise FileNotFoundError(
            f"torchvision dataset {name} not found (or incomplete) under data.root={root!r}; fungi-extract never "
            f"downloads: fetch it first, e.g. torchvision.datasets.{name}(root, download=True) on a machine online"
        ) from err


def imagefolder_split(root: str | Path, folder: str, train_folder: str):
    """``<root>/<folder>`` as an ImageFolder labelled with the class indices of ``<root>/<train_folder>``.

    torchvision numbers only the classes present in each folder, so a test (or validation) folder missing a train
    class would otherwise shift the labels of every later class. A class absent from the train folder is an error.
    """
    from torchvision.datasets.folder import find_classes

    from funai_common.datasets import ImageFolderDataset

    if folder == train_folder:
        return ImageFolderDataset(Path(root) / folder)
    train_dir = Path(root) / train_folder
    if not train_dir.is_dir():
        raise FileNotFoundError(f"train split {train_dir} missing; its class folders define the labels of {folder}")
    try:
        return ImageFolderDataset(Path(root) / folder, classes=find_classes(str(train_dir))[0])
    except ValueError as err:
        raise ValueError(f"split {Path(root) / folder} vs train split {train_dir}: {err}") from None


def _latin1_bytes(text, encoding="latin1"):
    """``_codecs.encode`` as protocol 0-2 pickles use it for byte strings (a numpy array's raw data): str -> bytes."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode is only accepted for (str, 'latin1'), got {type(text).__name__}")
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()`` as protocol 0-2 pickles write an empty byte string (an empty array's data); nothing else."""
    if args:
        raise pickle.UnpicklingError("bytes(...) is only accepted without arguments in a ground-truth pickle")
    return b""


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables an array or numpy scalar needs to be unpickled, under numpy 1 and numpy 2 module names."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
        from numpy.core.numeric import _frombuffer
    found = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}
    found.update({("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes})
    for package in ("numpy.core", "numpy._core"):
        found[(f"{package}.multiarray", "_reconstruct")] = _reconstruct
        found[(f"{package}.multiarray", "scalar")] = scalar
        found[(f"{package}.numeric", "_frombuffer")] = _frombuffer
    return found


class RefusedGlobalError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a class or function outside the allowed set (a ValueError too, so CLIs report it)."""


class GroundTruthUnpickler(pickle.Unpickler):
    """Unpickler for a revisited ground-truth file: plain containers, strings and numbers, plus numpy arrays, dtypes and
    numpy scalars (and, restricted to that use, the byte-string helpers protocol 0-2 pickles store array data with).
    Any other global (a class or function such as ``os.system``) is refused before anything is called."""

    def __init__(self, file, path: str | Path = "<stream>"):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays, as numpy advises
        self.path = path
        self.allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        """The allowed numpy global for ``(module, name)``; any other global is refused with RefusedGlobalError."""
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise RefusedGlobalError(
            f"{self.path} refers to {module}.{name}; a revisited ground-truth pickle may only hold lists, dicts, "
            "strings, numbers and numpy arrays, so it was not loaded"
        )


def ground_truth_path(root: str | Path, name: str) -> Path:
    """``<root>/<name>/gnd_<name>.pkl`` for a revisited dataset name (roxford5k or rparis6k)."""
    if name not in REVISITED:
        raise ValueError(f"unknown revisited dataset {name!r}; data.name must be one of {list(REVISITED)}")
    return Path(root) / name / f"gnd_{name}.pkl"


def _index_array(values, what: str, size: int, path: Path) -> np.ndarray:
    arr = np.asarray(values if values is not None else [], dtype=np.float64).reshape(-1)
    if arr.size and (np.any(arr != np.round(arr)) or arr.min() < 0 or arr.max() >= size):
        raise ValueError(f"{path}: {what} must hold indices into imlist (0..{size - 1})")
    return arr.astype(np.int64)


def load_ground_truth(path: str | Path) -> dict:
    """Read a revisited ground truth ``gnd_<name>.pkl`` with ``GroundTruthUnpickler`` and check it.

    Returns {'imlist': [str] (N database names), 'qimlist': [str] (Q query names), 'gnd': [Q dicts with 'bbx'
    ((x1, y1, x2, y2) floats, or None when absent) and 'easy', 'hard', 'junk' (int64 arrays of imlist indices)]}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ground truth {path} does not exist (the revisited layout is <root>/<name>/gnd_<name>.pkl next to "
            "<root>/<name>/jpg/*.jpg)"
        )
    with open(path, "rb") as f:
        try:
            raw = GroundTruthUnpickler(f, path).load()
        except RefusedGlobalError:
            raise
        except Exception as err:  # truncated or not a pickle: name the file instead of a bare pickle error
            raise ValueError(f"{path} is not a readable ground-truth pickle: {err}") from None
    missing = [k for k in ("imlist", "qimlist", "gnd") if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise ValueError(f"{path}: expected a dict with keys 'imlist', 'qimlist' and 'gnd'; missing {missing}")
    imlist, qimlist = [str(n) for n in raw["imlist"]], [str(n) for n in raw["qimlist"]]
    if len(raw["gnd"]) != len(qimlist):
        raise ValueError(f"{path}: {len(raw['gnd'])} 'gnd' entries for {len(qimlist)} queries in 'qimlist'")
    gnd = []
    for i, entry in enumerate(raw["gnd"]):
        if not isinstance(entry, dict) or "easy" not in entry or "hard" not in entry:
            raise ValueError(f"{path}: gnd[{i}] must be a dict with 'easy', 'hard' (and 'junk', 'bbx') index lists")
        bbx = entry.get("bbx")
        if bbx is not None:
            bbx = tuple(float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1))
            if len(bbx) != 4 or bbx[2] <= bbx[0] or bbx[3] <= bbx[1]:
                raise ValueError(f"{path}: gnd[{i}]['bbx'] must be [x1, y1, x2, y2] with x2 > x1, y2 > y1, got {bbx}")
        item = {"bbx": bbx}
        for key in ("easy", "hard", "junk"):
            item[key] = _index_array(entry.get(key), f"gnd[{i}][{key!r}]", len(imlist), path)
        gnd.append(item)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


class RevisitedDataset(Dataset):
    """Revisited Oxford 5k / Paris 6k as distributed: ``<root>/<name>/jpg/<image>.jpg`` and
    ``<root>/<name>/gnd_<name>.pkl``.

    ``split='database'`` yields the whole images of 'imlist', ``'queries'`` those of 'qimlist', cropped to their
    'bbx' when ``crop_queries`` (the revisited protocol). Items: (PIL RGB image, index into imlist / qimlist).
    """

    def __init__(self, root: str | Path, name: str, split: str, crop_queries: bool = False):
        if split not in RETRIEVAL_SPLITS:
            raise ValueError(
                f"unknown split {split!r} for a revisited dataset; expected one of {list(RETRIEVAL_SPLITS)}"
            )
        gnd_path = ground_truth_path(root, name)
        folder = gnd_path.parent
        if not folder.is_dir():
            raise FileNotFoundError(
                f"revisited dataset folder {folder} does not exist (expected {folder}/jpg/*.jpg and {gnd_path}; "
                "data.root is the folder holding it)"
            )
        self.ground_truth = load_ground_truth(gnd_path)
        names = self.ground_truth["imlist" if split == "database" else "qimlist"]
        self.paths = [folder / "jpg" / f"{n}.jpg" for n in names]
        absent = [p for p in self.paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of the {len(self.paths)} {split} images listed in {gnd_path} are "
                f"missing, e.g. {absent[0]}"
            )
        self.boxes = None
        if split == "queries" and crop_queries:
            self.boxes = [g["bbx"] for g in self.ground_truth["gnd"]]
            if any(b is None for b in self.boxes):
                raise ValueError(f"{gnd_path}: queries without 'bbx' cannot be cropped (set data.crop_queries=false)")
        self.split = split

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        # truncated JPEGs are decoded as far as they go, as the reference (PIL's LOAD_TRUNCATED_IMAGES for
        # Oxford/Paris), instead of stopping a long extraction; the global switch is restored afterwards
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
        try:
            with Image.open(self.paths[i]) as image:
                image = image.convert("RGB")
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
        if self.boxes is not None:
            image = image.crop(self.boxes[i])  # PIL rounds the float box, as the revisited code's crop
        return image, i


def check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is one of SPLITS."""
    if split not in SPLITS:
        raise ValueError(
            f"unknown split {split!r}; splits must be among {list(SPLITS)} "
            "(data.train_split / data.val_split / data.test_split name the folders or torchvision splits they read)"
        )


def validation_split(data: dict) -> str | None:
    """The folder or torchvision split that the ``val`` split reads, or None when the dataset has no validation split.

    ``data.val_split``: a name, null (none), or 'auto' (the default): ``val`` for the torchvision datasets in
    TORCHVISION_VAL_SPLITS, the folder ``<root>/val`` for an ImageFolder when it exists, None otherwise; None as well
    when 'val' is already the train or test split. Only image datasets (imagefolder, torchvision) have one.
    """
    name, kind = data.get("val_split", "auto"), data.get("kind")
    if name == "auto":
        # never the train or test split itself (the default test_split is 'val'): lambda would be chosen on the test set
        if "val" in (data.get("train_split"), data.get("test_split")):
            return None
        if kind == "torchvision":
            return "val" if data.get("name") in TORCHVISION_VAL_SPLITS else None
        if kind == "imagefolder" and data.get("root") and (Path(data["root"]) / "val").is_dir():
            return "val"
        return None
    if not name:
        return None
    if kind not in ("imagefolder", "torchvision"):
        raise ValueError(f"data.val_split={name!r} is only read for data.kind=imagefolder or torchvision, not {kind!r}")
    if name in (data.get("train_split"), data.get("test_split")):
        raise ValueError(
            f"data.val_split={name!r} is also the train or test split (data.train_split={data.get('train_split')!r}, "
            f"data.test_split={data.get('test_split')!r}); the validation images must be others"
        )
    if kind == "torchvision" and "split" not in torchvision_class(str(data.get("name")))[1]:
        raise ValueError(
            f"torchvision dataset {data.get('name')!r} takes no split= argument, so it has no validation split "
            f"(data.val_split={name!r}); use data.val_split=null"
        )
    return name


def check_data_split(data: dict, split: str) -> None:
    """Raise ValueError unless ``split`` is a split of the ``data`` config's kind: RETRIEVAL_SPLITS for
    ``kind=revisited``, SPLITS otherwise."""
    if data.get("kind") != "revisited":
        check_split(split)
    elif split not in RETRIEVAL_SPLITS:
        raise ValueError(
            f"unknown split {split!r} for data.kind=revisited; splits must be among {list(RETRIEVAL_SPLITS)} "
            "(splits=[database,queries])"
        )


def build_split(data: dict, split: str):
    """Dataset for ``split`` ('train', 'val' or 'test'; 'database' or 'queries' for revisited) from the ``data``
    config; 'val' reads ``validation_split(data)`` and is an error for a dataset without one."""
    check_data_split(data, split)
    kind = data["kind"]
    if split == "val":
        folder = validation_split(data)
        if folder is None:
            raise ValueError(
                f"split 'val' requested but the dataset (data.kind={kind}) has no validation split: set "
                "data.val_split to its folder or torchvision split, or leave 'val' out of splits"
            )
        data = {**data, "val_split": folder}
    if kind == "revisited":
        if not data.get("root") or not data.get("name"):
            raise ValueError(f"data.kind=revisited needs data.root and data.name (one of {list(REVISITED)})")
        return RevisitedDataset(data["root"], data["name"], split, data.get("crop_queries", False))
    if kind == "digits":
        train, test = digits_split(data["image_size"], data.get("train_per_class"), data.get("seed", 0))
        return train if split == "train" else test
    if kind == "imagefolder":
        return imagefolder_split(data["root"], data[f"{split}_split"], data["train_split"])
    if kind == "torchvision":
        return torchvision_dataset(data["name"], data["root"], data[f"{split}_split"])
    if kind in ("text", "audio"):
        rows = read_table(data[f"{split}_file"])
        classes = None
        if split == "test":
            _, classes = label_ids([y for _, y in read_table(data["train_file"])])
        ys, _ = label_ids([y for _, y in rows], classes)
        if kind == "text":
            return TensorPairs([x for x, _ in rows], ys)
        base = Path(data[f"{split}_file"]).parent
        return TensorPairs([load_spectrogram(base / x, data["num_mel_bins"], data["max_length"]) for x, _ in rows], ys)
    raise ValueError(f"unknown data.kind {kind!r}; expected digits, imagefolder, torchvision, text, audio or revisited")
