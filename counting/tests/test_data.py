import sys
import types

import numpy as np
import torch
from PIL import Image

from counting.collage import normalize
from counting.data import CARPK, MSO, mso_boxes

BOXES = np.array([[1.0, 2, 30, 40], [5, 6, 7, 8]])


def fake_mat73(annos):
    return types.SimpleNamespace(loadmat=lambda path: {"imgIdx": {"name": ["a.jpg", "b.jpg"], "anno": annos}})


def test_mso_boxes_of_empty_matlab_matrices():
    assert mso_boxes(None).shape == (0, 4)  # mat73 >= 0.59
    assert mso_boxes(np.array([0.0, 0.0])).shape == (0, 4)  # older mat73: the dims array
    assert mso_boxes(np.array([1.0, 2, 3, 4])).tolist() == [[1, 2, 3, 4]]


def test_mso_skips_images_without_objects_mat73(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    for name in ("imgIdx.mat", "img/a.jpg"):
        (tmp_path / name).touch()
    for empty in (None, np.array([0.0, 0.0])):
        monkeypatch.setitem(sys.modules, "mat73", fake_mat73([BOXES, empty]))
        items = MSO(tmp_path).items
        assert [(p.name, c) for p, _, c, *_ in items] == [("a.jpg", 2.0)]
        assert np.array_equal(items[0][1], BOXES)


class Dataset:
    def __init__(self, data, **attrs):
        self.data, self.attrs = np.asarray(data), attrs

    def __array__(self, dtype=None, copy=None):
        return self.data.astype(dtype) if dtype else self.data


class File(dict):
    """h5py.File stand-in with the layout MATLAB v7.3 writes: cells of references, column-major data."""

    def __init__(self, path, mode):
        chars = lambda s: Dataset(np.array([[ord(c)] for c in s], dtype=np.uint16))  # noqa: E731
        refs = np.array([["n0"], ["n1"]], dtype=object), np.array([["a0"], ["a1"]], dtype=object)
        super().__init__(
            imgIdx={"name": refs[0], "anno": refs[1]},
            n0=chars("a.jpg"),
            n1=chars("b.jpg"),
            a0=Dataset(BOXES.T),  # a 2x4 MATLAB matrix is stored transposed
            a1=Dataset(np.array([0, 0], dtype=np.uint64), MATLAB_class="double", MATLAB_empty=1),
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mso_skips_images_without_objects_h5py(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    for name in ("imgIdx.mat", "img/a.jpg"):
        (tmp_path / name).touch()
    modules = sys.modules
    monkeypatch.setitem(modules, "mat73", None)  # import fails: the h5py path is taken
    monkeypatch.setitem(modules, "h5py", types.SimpleNamespace(File=File))
    items = MSO(tmp_path).items
    assert [(p.name, c) for p, _, c, *_ in items] == [("a.jpg", 2.0)]
    assert np.array_equal(items[0][1], BOXES)


def test_mso_images_are_resized_without_antialias(tmp_path, monkeypatch):
    """The reference's MSO transform is ToTensor, then Resize((384, 384)): a tensor resize, not antialiased in
    torchvision 0.14 (unlike the PIL resize of its FSC-147 loader)."""
    (tmp_path / "img").mkdir()
    (tmp_path / "imgIdx.mat").touch()
    pixels = np.random.default_rng(0).integers(0, 256, size=(500, 600, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img" / "a.jpg", quality=95)
    monkeypatch.setitem(sys.modules, "mat73", fake_mat73([BOXES, None]))
    item = MSO(tmp_path)[0]
    with Image.open(tmp_path / "img" / "a.jpg") as img:
        image = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
    plain = torch.nn.functional.interpolate(image[None], size=(384, 384), mode="bilinear", align_corners=False)[0]
    assert item["image"].shape == (3, 384, 384)
    assert torch.allclose(item["image"], normalize(plain), atol=1e-5)


def test_carpk_images_are_resized_without_antialias(tmp_path):
    """The reference's CARPK images go through ToTensor, then Resize((384, 384)) (``test_baselines``' transform,
    the only evaluator wired to CARPK): a tensor resize, not antialiased in torchvision 0.14, as for MSO."""
    for d in ("Images", "Annotations", "ImageSets"):
        (tmp_path / d).mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(500, 900, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "Images" / "a.png")  # lossless: the decoded pixels are ``pixels``
    (tmp_path / "Annotations" / "a.txt").write_text("100 50 190 140 1\n300 200 420 300 1\n")
    (tmp_path / "ImageSets" / "test.txt").write_text("a\n")
    item = CARPK(tmp_path)[0]
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    plain = torch.nn.functional.interpolate(image[None], size=(384, 384), mode="bilinear", align_corners=False)[0]
    assert item["image"].shape == (3, 384, 384)
    assert torch.allclose(item["image"], normalize(plain), atol=1e-5)
    # exemplar 0: rows int(50 * 384 / 500) .. int(140 * 384 / 500), cols int(100 * 384 / 900) .. int(190 * 384 / 900)
    assert item["rects"][0].tolist() == [38, 42, 107, 81]
    crop = normalize(plain)[:, 38:108, 42:82]
    expected = torch.nn.functional.interpolate(crop[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(item["exemplars"][0], expected, atol=1e-5)
