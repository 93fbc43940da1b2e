import json
import logging
import math
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from counting.checkpoint import save_checkpoint
from counting.collage import normalize
from counting.config import load_config
from counting.data import CARPK, FSC147, prepare_test_image
from counting.eval import cli as eval_cli
from counting.eval import load_trained_model
from counting.eval import main as eval_main
from counting.metrics import count_metrics
from counting.models import build_model
from counting.predict import main as predict_main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg, _ = load_config(["--config", "tiny"])
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return save_checkpoint(tmp_path_factory.mktemp("run"), 1, model, optimizer, cfg, {})


@pytest.fixture(scope="module")
def fsc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("FSC147_384_V2")
    (root / "images_384_VarV2").mkdir()
    rng = np.random.default_rng(0)
    annotations, sizes = {}, {"a.jpg": (64, 100), "b.jpg": (64, 64), "c.jpg": (50, 90)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images_384_VarV2" / name)
        boxes = [[2, 3, 12, 14], [20, 10, 31, 22], [5, 30, 9, 34]]  # x1, y1, x2, y2
        annotations[name] = {
            "points": [[1, 1]] * (5 if name != "c.jpg" else 45),
            "box_examples_coordinates": [[[x1, y1], [x1, y2], [x2, y2], [x2, y1]] for x1, y1, x2, y2 in boxes],
            "H": h,
            "W": w,
        }
    (root / "annotation_FSC147_384.json").write_text(json.dumps(annotations))
    (root / "Train_Test_Val_FSC_147.json").write_text(
        json.dumps({"train": [], "val": ["a.jpg"], "test": ["b.jpg", "c.jpg"]})
    )
    return root


def test_prepare_test_image_by_hand():
    image = torch.rand(3, 100, 150)
    item = prepare_test_image(image, torch.tensor([[10.0, 20.0, 30.0, 40.0]]), patch_size=8, target_height=64)
    assert item["image"].shape == (3, 64, 96)  # width 8 * int(150 / 100 * 64 / 8) = 96
    assert item["rects"].tolist() == [[12, 6, 25, 19]]  # int(20 * .64), int(10 * .64), int(40 * .64), int(30 * .64)
    resized = normalize(F.interpolate(image[None], size=(64, 96), mode="bilinear", antialias=True)[0])
    crop = F.interpolate(resized[None, :, 12:26, 6:20], size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(item["exemplars"][0], crop, atol=1e-5)
    assert torch.allclose(item["rel_boxes"][0], torch.tensor([10 / 150, 20 / 100, 30 / 150, 40 / 100]))


def test_test_size_truncates_the_width_to_whole_patches():
    from counting.data import test_size

    assert test_size(100, 140, 16) == (384, 528)  # 16 * int(1.4 * 384 / 16 = 33.6), not 16 * 34
    assert test_size(100, 150, 8, 64) == (64, 96)
    assert test_size(100, 5, 16) == (384, 16)  # at least one patch
    assert test_size(100, 140, 16, fixed=True) == (384, 384)


def test_exemplar_rects_are_clamped_per_axis_on_a_wide_image():
    """A box on the far right and bottom edges of a 2:1 image: rows clamp to H'-1, columns to W'-1."""
    image = torch.rand(3, 50, 100)
    item = prepare_test_image(image, torch.tensor([[80.0, 40.0, 100.0, 50.0]]), patch_size=8, target_height=64)
    assert item["image"].shape == (3, 64, 128)
    assert item["rects"].tolist() == [[51, 102, 63, 127]]  # int(40 * 1.28), int(80 * 1.28), 64 -> 63, 128 -> 127
    assert item["exemplars"].shape == (1, 3, 64, 64)


def test_fsc147_parsing(fsc_root):
    ds = FSC147(fsc_root, "test", patch_size=8, target_height=64)
    assert len(ds) == 2 and ds.items[1][2] == 45.0
    assert ds.items[0][1].tolist()[1] == [20, 10, 31, 22]
    item = ds[1]  # c.jpg, 50 x 90 shown at 64 x 112; 45 dots on (1, 1) -> one pixel (int(1.28), int(1.24))
    assert item["gt_density"].shape == item["image"].shape[-2:] == (64, 112)
    assert float(item["gt_density"].sum()) == pytest.approx(3000, rel=1e-4)
    assert divmod(int(item["gt_density"].argmax()), 112) == (1, 1)
    with pytest.raises(ValueError, match="unknown FSC-147 split"):
        FSC147(fsc_root, "nope")
    with pytest.raises(FileNotFoundError, match="annotation_FSC147_384.json"):
        FSC147(fsc_root / "missing")


@pytest.fixture
def carpk_root(tmp_path):
    for d in ("Images", "Annotations", "ImageSets"):
        (tmp_path / d).mkdir()
    for name in ("x", "empty"):
        Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "Images" / f"{name}.png")
    (tmp_path / "Annotations" / "x.txt").write_text("1 2 10 12 1\n20 20 30 28 1\n")
    (tmp_path / "Annotations" / "empty.txt").write_text("")
    (tmp_path / "ImageSets" / "test.txt").write_text("x\nempty\n")
    return tmp_path


def test_carpk_parsing_skips_images_without_cars(carpk_root, caplog):
    with caplog.at_level(logging.WARNING, logger="counting"):
        ds = CARPK(carpk_root, target_height=32, patch_size=8)
    assert [item[3] for item in ds.items] == ["x"]
    assert "skipped 1 images without annotated cars" in caplog.text and "'empty'" in caplog.text
    item = ds[0]
    assert item["count"] == 2.0 and item["image"].shape == (3, 32, 32) and item["exemplars"].shape[0] == 2
    with pytest.raises(ValueError, match="no exemplar boxes"):
        prepare_test_image(torch.rand(3, 40, 60), torch.zeros(0, 4))


def test_fsc147_image_missing_from_annotations(fsc_root, tmp_path):
    for name in ("annotation_FSC147_384.json", "images_384_VarV2"):
        (tmp_path / name).symlink_to(fsc_root / name)
    (tmp_path / "Train_Test_Val_FSC_147.json").write_text(json.dumps({"test": ["b.jpg", "9.jpg"]}))
    with pytest.raises(ValueError, match=r"1 images of FSC-147 split 'test'.*annotation_FSC147_384.json: \['9.jpg'\]"):
        FSC147(tmp_path, "test")


def test_fsc147_and_carpk_check_listed_images_exist_up_front(fsc_root, carpk_root, tmp_path):
    for name in ("annotation_FSC147_384.json", "images_384_VarV2"):
        (tmp_path / name).symlink_to(fsc_root / name)
    listed = ["b.jpg", "gone1.jpg", "c.jpg", "gone2.jpg"]
    (tmp_path / "Train_Test_Val_FSC_147.json").write_text(json.dumps({"test": listed}))
    annotations = json.loads((fsc_root / "annotation_FSC147_384.json").read_text())
    annotations["gone1.jpg"] = annotations["gone2.jpg"] = annotations["b.jpg"]
    (tmp_path / "annotation_FSC147_384.json").unlink()
    (tmp_path / "annotation_FSC147_384.json").write_text(json.dumps(annotations))
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 images listed in .*Train_Test_Val_FSC_147.json") as err:
        FSC147(tmp_path, "test")
    assert str(tmp_path / "images_384_VarV2" / "gone1.jpg") in str(err.value) and "c.jpg" not in str(err.value)
    (carpk_root / "Images" / "x.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 1 images listed in .*test.txt .*x.png"):
        CARPK(carpk_root)


def test_eval_carpk_default_split_and_errors(checkpoint, carpk_root, tmp_path, monkeypatch, capsys):
    args = [f"checkpoint={checkpoint}", "dataset=carpk", f"root={carpk_root}", "target_height=64", "window=64"]
    results = eval_main([*args, "stride=32", "figures=0", f"out={tmp_path / 'eval'}"])
    assert set(results) == {"test"} and results["test"]["num_images"] == 1
    # one image leaves two of the three count subsets empty: NaN in memory, null in the (standard) JSON files
    assert sum(math.isnan(results["test"][s]["mae"]) for s in ("low", "medium", "high")) == 2
    for name in ("metrics.json", "predictions.json"):
        constants = []
        json.loads((tmp_path / "eval" / name).read_text(), parse_constant=constants.append)
        assert constants == [], f"{name} holds {constants}, not standard JSON"
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"]["test"]
    assert sorted(s for s in ("low", "medium", "high") if written[s] == {"mae": None, "rmse": None}) == sorted(
        s for s in ("low", "medium", "high") if math.isnan(results["test"][s]["mae"])
    )
    with pytest.raises(FileNotFoundError, match=r"val.txt missing \(split 'val'; lists found: \['test'\]\)"):
        eval_main([*args, "splits=[val]", f"out={tmp_path / 'val'}"])
    with pytest.raises(ValueError, match="MSO has a single split"):
        eval_main([f"checkpoint={checkpoint}", "dataset=mso", f"root={tmp_path}", "splits=[val]", f"out={tmp_path}"])
    # a missing optional reader is reported by the console script in one line
    (tmp_path / "imgIdx.mat").touch()
    monkeypatch.setitem(sys.modules, "mat73", None)
    monkeypatch.setitem(sys.modules, "h5py", None)
    monkeypatch.setattr(sys, "argv", ["counting-eval", f"checkpoint={checkpoint}", "dataset=mso", f"root={tmp_path}"])
    with pytest.raises(SystemExit, match=r"^counting-eval: error: reading MSO's imgIdx.mat needs `pip install mat73`"):
        eval_cli()


def test_eval_main_end_to_end(checkpoint, fsc_root, tmp_path):
    out = tmp_path / "eval"
    args = [
        f"checkpoint={checkpoint}",
        f"root={fsc_root}",
        "target_height=64",
        "window=64",
        "stride=32",
        f"out={out}",
        "figures=1",
    ]
    results = eval_main(args)
    assert set(results) == {"val", "test"} and results["test"]["num_images"] == 2
    predictions = json.loads((out / "predictions.json").read_text())
    recomputed = count_metrics([r["pred"] for r in predictions["test"]], [r["gt"] for r in predictions["test"]])
    assert results["test"]["mae"] == pytest.approx(recomputed["mae"])
    assert json.loads((out / "metrics.json").read_text())["results"]["test"]["high"]["mae"] == pytest.approx(
        recomputed["high"]["mae"]
    )
    assert (out / "figures" / "test" / "b.png").is_file() and not (out / "figures" / "test" / "c.png").exists()
    with pytest.raises(ValueError, match="checkpoint=PATH"):  # counting-eval: error: ... (a bare line before)
        eval_main([f"root={fsc_root}"])
    # a wrong checkpoint path is reported before anything is written (the default out is <run>/eval_<dataset>)
    missing = tmp_path / "run" / "checkpoints" / "step_000009"
    with pytest.raises(FileNotFoundError, match=r"step_000009/state.json not found.*model_config=PATH"):
        eval_main([f"checkpoint={missing}", f"root={fsc_root}"])
    assert not (tmp_path / "run").exists()


def test_eval_single_split_figure_name_and_bad_values(checkpoint, fsc_root, tmp_path, monkeypatch):
    args = [f"checkpoint={checkpoint}", f"root={fsc_root}", "target_height=64", "window=64", "stride=32"]
    out = tmp_path / "eval"
    # splits=test and figures=c.jpg are one split and one image (not the letters of a string, nor a substring)
    results = eval_main([*args, "splits=test", "figures=c.jpg", f"out={out}"])
    assert set(results) == {"test"} and sorted(p.name for p in (out / "figures" / "test").iterdir()) == ["c.png"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='gpu' is not a device; expected auto, cpu, cuda"):
        eval_main([*args, "device=gpu", f"out={tmp_path / 'gpu'}"])
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available"):
        eval_main([*args, "device=cuda", f"out={tmp_path / 'cuda'}"])
    with pytest.raises(ValueError, match="window 60x60 px is not a multiple of the model's patch size 8"):
        eval_main([*args[:2], "target_height=60", "window=60", f"out={tmp_path / 'w'}"])
    with pytest.raises(ValueError, match="stride must be a positive number of pixels, got 0"):
        eval_main([*args[:4], "stride=0", f"out={tmp_path / 's'}"])


def test_predict_main(checkpoint, tmp_path, capsys):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "fig.png"
    args = [str(path), "--boxes", "2,3,12,14", "20,10,31,22", "--checkpoint", str(checkpoint), "--out", str(out)]
    result = predict_main(args + ["--height", "64", "--stride", "32"])
    assert out.is_file() and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == result["count"]
    run_folder = ["--checkpoint", str(checkpoint.parent.parent), "--height", "64", "--stride", "32"]
    latest = predict_main([*args[:-4], *run_folder, "--out", str(tmp_path / "run.png")])  # was: state.json not found
    assert latest["checkpoint"] == str(checkpoint) and latest["count"] == result["count"]
    with pytest.raises(SystemExit):
        predict_main([str(path), "--boxes", "5,5,2,2", "--checkpoint", str(checkpoint)])
    with pytest.raises(ValueError, match="outside"):
        predict_main([str(path), "--boxes", "5,5,200,20", "--checkpoint", str(checkpoint), "--height", "64"])
    with pytest.raises(ValueError, match="window 60x60 px is not a multiple of the model's patch size 8"):
        predict_main(args + ["--height", "60"])


def test_fsc147_dot_map_follows_each_axis_of_the_resize(tmp_path):
    """Dots land where the anisotropic test resize puts them: x scales with the width, y with the height (the
    fixture's dot at (1, 1) cannot tell the axes apart)."""
    (tmp_path / "images_384_VarV2").mkdir()
    Image.fromarray(np.zeros((50, 90, 3), np.uint8)).save(tmp_path / "images_384_VarV2" / "d.jpg")
    corners = [[[2, 3], [2, 14], [12, 14], [12, 3]]]
    points = [[80.0, 40.0], [10.0, 45.0], [60.5, 5.5]]
    ann = {"d.jpg": {"points": points, "box_examples_coordinates": corners, "H": 50, "W": 90}}
    (tmp_path / "annotation_FSC147_384.json").write_text(json.dumps(ann))
    (tmp_path / "Train_Test_Val_FSC_147.json").write_text(json.dumps({"train": [], "val": [], "test": ["d.jpg"]}))
    item = FSC147(tmp_path, "test", patch_size=8, target_height=64)[0]
    density = item["gt_density"]
    assert density.shape == (64, 112)  # 8 * int(90 / 50 * 64 / 8) = 112
    peaks = density == F.max_pool2d(density[None, None], 3, 1, 1)[0, 0]
    found = sorted(zip(*[t.tolist() for t in torch.nonzero(peaks & (density > 100), as_tuple=True)]))
    expected = sorted((int(y * 64 / 50), int(x * 112 / 90)) for x, y in points)
    assert found == expected == [(7, 75), (51, 99), (57, 12)]
    # the points marked in the figures: the same positions before truncation to pixels
    torch.testing.assert_close(item["points"], torch.tensor([[x * 112 / 90, y * 64 / 50] for x, y in points]))


def test_density_figure_has_a_ground_truth_panel_for_points_or_dot_map(tmp_path):
    """The third panel appears for ``gt_density`` or ``gt_points`` (points alone used to be ignored)."""
    from counting.figures import save_density_figure

    image, density = torch.rand(3, 32, 48), torch.rand(32, 48)
    points = torch.tensor([[5.0, 6.0], [40.0, 20.0]])
    widths = {}
    for name, extra in {
        "plain": {},
        "points": {"gt_points": points},
        "both": {"gt_points": points, "gt_density": torch.rand(32, 48)},
    }.items():
        save_density_figure(tmp_path / f"{name}.png", image, density, 2.0, 2, **extra)
        widths[name] = Image.open(tmp_path / f"{name}.png").size[0]
    assert widths == {"plain": 1000, "points": 1500, "both": 1500}  # figsize (10 | 15) x 4.5 in at 100 dpi


def test_density_figure_takes_half_precision_images(tmp_path):
    """A bfloat16 image (autocast / half-precision pipelines) used to reach ``.numpy()``, which has no bfloat16."""
    from counting.figures import save_density_figure, to_display

    image = torch.rand(3, 32, 48)
    shown = to_display(image.bfloat16())
    assert shown.dtype == torch.float32 and shown.shape == (32, 48, 3)
    torch.testing.assert_close(shown, image.bfloat16().float().permute(1, 2, 0))
    save_density_figure(tmp_path / "bf16.png", image.bfloat16(), torch.rand(32, 48).bfloat16(), 2.0, 2)
    assert (tmp_path / "bf16.png").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_density_figure_takes_cuda_tensors(tmp_path):
    """A normalised CUDA image used to meet the CPU mean/std of ``to_display``."""
    from counting.collage import normalize
    from counting.figures import save_density_figure, to_display

    image = torch.rand(3, 32, 48)
    torch.testing.assert_close(to_display(normalize(image).cuda()), image.permute(1, 2, 0), atol=1e-5, rtol=0)
    save_density_figure(tmp_path / "cuda.png", normalize(image).cuda(), torch.rand(32, 48).cuda(), 2.0, 2)
    assert (tmp_path / "cuda.png").is_file()


def test_fsc147_uses_the_first_exemplar_boxes(fsc_root):
    ds = FSC147(fsc_root, "test", patch_size=8, target_height=64, shots=1)
    item = ds[0]  # b.jpg, 64 x 64: shown at 64 x 64, boxes unscaled
    assert item["rects"].tolist() == [[3, 2, 14, 12]]  # the first box (x1, y1, x2, y2) = (2, 3, 12, 14) as y1, x1, ...
    ds = FSC147(fsc_root, "test", patch_size=8, target_height=64, shots=2)
    assert ds[0]["rects"].tolist() == [[3, 2, 14, 12], [10, 20, 22, 31]]


def test_bad_fsc147_files_boxes_and_images_are_errors_naming_them(fsc_root, tmp_path):
    """Annotations of another layout, inverted or out-of-image exemplar boxes and an unreadable image: errors naming
    the file and image (they were tracebacks, an error reading only 'points', or a count from a 1-px exemplar)."""
    (tmp_path / "images_384_VarV2").symlink_to(fsc_root / "images_384_VarV2")
    (tmp_path / "Train_Test_Val_FSC_147.json").write_text(json.dumps({"test": ["b.jpg"]}))
    good = json.loads((fsc_root / "annotation_FSC147_384.json").read_text())["b.jpg"]

    def fsc147(entry):
        (tmp_path / "annotation_FSC147_384.json").write_text(json.dumps({"b.jpg": entry}))
        return FSC147(tmp_path, "test", target_height=32, patch_size=8)

    with pytest.raises(KeyError, match=r"annotation_FSC147_384.json: the entry of b.jpg lacks 'points'"):
        fsc147({"box_examples_coordinates": good["box_examples_coordinates"]})
    with pytest.raises(ValueError, match=r"coordinates of b.jpg has shape \(1, 4\); expected \(k, 4, 2\)"):
        fsc147({**good, "box_examples_coordinates": [[2, 3, 12, 14]]})  # x1, y1, x2, y2 instead of corners
    with pytest.raises(ValueError, match=r"exemplar boxes of b.jpg \[\[12.0, 14.0, 2.0, 3.0\]\] are inverted"):
        fsc147({**good, "box_examples_coordinates": [[[12, 14], [12, 3], [2, 3], [2, 14]]]})
    outside = fsc147({**good, "box_examples_coordinates": [[[70, 5], [70, 9], [80, 9], [80, 5]]]})
    with pytest.raises(ValueError, match=r"boxes \[\[70.0, 5.0, 80.0, 9.0\]\] of .*b.jpg lie outside its 64x64"):
        outside[0]
    (tmp_path / "Train_Test_Val_FSC_147.json").write_text(json.dumps({"test": "b.jpg"}))  # letters, not a list
    with pytest.raises(ValueError, match=r"Train_Test_Val_FSC_147.json: expected a mapping of split names to lists"):
        FSC147(tmp_path, "test")
    (tmp_path / "Train_Test_Val_FSC_147.json").write_text(json.dumps({"test": ["b.jpg"]}))
    (tmp_path / "annotation_FSC147_384.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"annotation_FSC147_384.json is not valid JSON"):
        FSC147(tmp_path, "test")
    (tmp_path / "images_384_VarV2").unlink()
    (tmp_path / "images_384_VarV2").mkdir()
    (tmp_path / "images_384_VarV2" / "b.jpg").write_bytes(b"not a jpeg" * 20)
    with pytest.raises(ValueError, match=r"b.jpg is not a readable image"):
        fsc147(good)[0]


def test_bad_carpk_rows_are_errors_naming_the_file(carpk_root):
    (carpk_root / "Annotations" / "x.txt").write_text("1 2 10 12 1\nfoo bar\n")
    with pytest.raises(ValueError, match=r"x.txt: .*; expected rows 'x1 y1 x2 y2 cls'"):
        CARPK(carpk_root)
    (carpk_root / "Annotations" / "x.txt").write_text("1 2 10 1\n")  # the class column left out: y2 < y1
    with pytest.raises(ValueError, match=r"x.txt: exemplar boxes of x \[\[1.0, 2.0, 10.0, 1.0\]\] are inverted"):
        CARPK(carpk_root)


def test_eval_bad_values_checkpoints_and_out_are_errors_naming_them(checkpoint, fsc_root, tmp_path):
    """Values that evaluated nothing (null metrics) or sliced the exemplars oddly, a damaged or other-size checkpoint,
    a model config without a model and an output path under a file: one-line errors, nothing overwritten."""
    args = [f"checkpoint={checkpoint}", f"root={fsc_root}", "target_height=64", "window=64", "stride=32"]
    for bad, message in (
        ("shots=-1", "shots=-1: expected the number of exemplars per image"),
        ("max_images=0", "max_images=0: expected a positive integer"),
        ("window=abc", "window='abc': expected a number"),
    ):
        with pytest.raises(ValueError, match=message):
            eval_main([*args, bad, f"out={tmp_path / 'eval'}"])
    assert not (tmp_path / "eval").exists()
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match=r"^out: .*file is a file; expected a folder"):
        eval_main([*args, f"out={tmp_path / 'file' / 'eval'}"])
    assert (tmp_path / "file").read_text() == "kept"
    empty = tmp_path / "empty_split"
    empty.mkdir()
    for name in ("annotation_FSC147_384.json", "images_384_VarV2"):
        (empty / name).symlink_to(fsc_root / name)
    (empty / "Train_Test_Val_FSC_147.json").write_text(json.dumps({"val": [], "test": ["b.jpg"]}))
    with pytest.raises(ValueError, match=r"fsc147 split 'val' under .*empty_split has no image to evaluate"):
        eval_main([*args[:1], f"root={empty}", *args[2:], f"out={tmp_path / 'e2'}"])

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    (damaged / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"damaged/model.safetensors is not a readable safetensors file"):
        load_trained_model(damaged)
    state = json.loads((checkpoint / "state.json").read_text())
    state["config"]["model"]["fim_dim"] = 64
    (damaged / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    (damaged / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"does not fit the model of the config \(\d+ shape mismatches"):
        load_trained_model(damaged)
    (tmp_path / "eval.yaml").write_text("dataset: fsc147\n")
    with pytest.raises(KeyError, match=r"eval.yaml lacks the sections \['model', 'collage'\]"):
        load_trained_model(checkpoint / "model.safetensors", tmp_path / "eval.yaml")


def test_predict_out_folder_and_unreadable_image_are_errors(checkpoint, tmp_path):
    """--out naming a folder wrote <folder>.png and reported the folder; an unreadable image was a traceback."""
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(path)
    args = ["--boxes", "2,3,12,14", "--checkpoint", str(checkpoint), "--height", "64"]
    with pytest.raises(ValueError, match=r"^--out .* is a folder; expected the path of the figure"):
        predict_main([str(path), *args, "--out", str(tmp_path)])
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg" * 20)
    with pytest.raises(ValueError, match=r"bad.jpg is not a readable image"):
        predict_main([str(tmp_path / "bad.jpg"), *args])


def test_eval_of_a_run_folder_takes_its_latest_checkpoint(checkpoint, fsc_root, tmp_path):
    """A run folder was "<run>/state.json not found"; neco-eval and sharelock-eval take one (its latest checkpoint)."""
    args = [f"root={fsc_root}", "target_height=64", "window=64", "stride=32", "figures=0", "splits=[test]"]
    direct = eval_main([*args, f"checkpoint={checkpoint}", f"out={tmp_path / 'a'}"])["test"]
    by_run = eval_main([*args, f"checkpoint={checkpoint.parent.parent}", f"out={tmp_path / 'b'}"])["test"]
    assert (by_run["mae"], by_run["rmse"]) == (direct["mae"], direct["rmse"])
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"run folder .*empty holds no checkpoint under .*empty/checkpoints"):
        eval_main([*args, f"checkpoint={tmp_path / 'empty'}"])
