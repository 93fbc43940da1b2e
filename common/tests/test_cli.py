import argparse
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from funai_common import demo
from funai_common.cli import hummingbird_main, knn_cli, knn_main, load_features
from funai_common.knn import knn_classify
from funai_common.weights import load_state_dict


def test_knn_cli_safetensors_and_npy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train_f, test_f = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(30, 8)).astype(np.float32)
    train_y, test_y = rng.integers(0, 3, 60), rng.integers(0, 3, 30)
    save_file({"features": torch.tensor(train_f), "labels": torch.tensor(train_y)}, str(tmp_path / "train.safetensors"))
    np.save(tmp_path / "test.npy", test_f)
    np.save(tmp_path / "test_y.npy", test_y)
    out = tmp_path / "knn.json"
    knn_main(
        [
            "--train",
            str(tmp_path / "train.safetensors"),
            "--test",
            str(tmp_path / "test.npy"),
            "--test-labels",
            str(tmp_path / "test_y.npy"),
            "--k",
            "5",
            "20",
            "--out",
            str(out),
        ]
    )
    written = json.loads(out.read_text())
    assert written["20"] == knn_classify(train_f, train_y, test_f, test_y, k=20)
    assert "top-1" in capsys.readouterr().out


def test_feature_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_features(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="features"):
        load_features(tmp_path / "bad.safetensors")
    np.save(tmp_path / "f.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="labels file"):
        load_features(tmp_path / "f.npy")


def test_unreadable_feature_and_weight_files_are_named(tmp_path):
    # a truncated download or a file of another format: a ValueError naming it (the CLIs print it on one line)
    save_file({"features": torch.zeros(4, 2), "labels": torch.zeros(4)}, str(tmp_path / "ok.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:20])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("cut.safetensors", "junk.safetensors"):
        with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file \(.+\): truncated"):
            load_features(tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file"):
            load_state_dict(tmp_path / name)
    torch.save({"w": torch.ones(100)}, tmp_path / "w.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:200])
    (tmp_path / "junk.pth").write_bytes(b"\xff" * 64)
    for name in ("cut.pth", "junk.pth"):
        with pytest.raises(ValueError, match=rf"checkpoint .*{name} is not a readable PyTorch state dict \(.+\)$"):
            load_state_dict(tmp_path / name)


def test_cli_output_device_and_model_args_are_checked_up_front(tmp_path):
    save_file({"features": torch.eye(3), "labels": torch.arange(3)}, str(tmp_path / "f.safetensors"))
    knn = ["--train", str(tmp_path / "f.safetensors"), "--test", str(tmp_path / "f.safetensors"), "--k", "1"]
    with pytest.raises(ValueError, match=rf"--out {tmp_path} is a directory; expected the path of a JSON file"):
        knn_main([*knn, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--out .*f.safetensors/knn.json: .*f.safetensors is a file, not a directory"):
        knn_main([*knn, "--out", str(tmp_path / "f.safetensors" / "knn.json")])
    hummingbird = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--dataset", "synthetic", "--input-size", "32"]
    with pytest.raises(ValueError, match=r"--device 'gpu' is not a torch device; expected cpu, cuda or cuda:N"):
        hummingbird_main([*hummingbird, "--device", "gpu"])
    with pytest.raises(ValueError, match=r"--model-args \{.*'patch_sz': 8\} do not fit --model 'vit_tiny_patch16_224'"):
        hummingbird_main([*hummingbird, "--device", "cpu", "--model-args", "patch_sz=8"])


def test_knn_cli_prints_a_missing_key_as_one_line_without_quotes(tmp_path, monkeypatch):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    argv = ["funai-knn", "--train", str(tmp_path / "bad.safetensors"), "--test", str(tmp_path / "bad.safetensors")]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_:
        knn_cli()
    expected = f"funai-knn: error: {tmp_path / 'bad.safetensors'} lacks the keys ['features', 'labels'] (has ['x'])"
    assert exit_.value.code == expected


class _Custom:
    """Stands for an arbitrary pickled object in a checkpoint."""


def test_legacy_checkpoint_is_read_without_unpickling(tmp_path):
    torch.save({"teacher": {"module.backbone.w": torch.ones(2)}, "student": {}}, tmp_path / "ckpt.pth")
    state = load_state_dict(tmp_path / "ckpt.pth", strip_prefixes=("module.", "backbone."))
    assert list(state) == ["w"] and torch.equal(state["w"], torch.ones(2))

    # a DINO/DoRA training checkpoint keeps its argparse arguments next to the weights: readable
    torch.save(
        {"teacher": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1, arch="vit_small")}, tmp_path / "d.pth"
    )
    assert list(load_state_dict(tmp_path / "d.pth")) == ["w"]
    # any other Python object would need unpickling code: refused
    torch.save({"model": {"w": torch.ones(1)}, "config": _Custom()}, tmp_path / "unsafe.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_state_dict(tmp_path / "unsafe.pth")
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(x=_Custom())}, tmp_path / "nested.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_state_dict(tmp_path / "nested.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_state_dict(tmp_path / "missing.pth")


def test_checkpoint_keeps_its_table_interpolated_like_dino(tmp_path):
    import timm
    from timm.layers import resample_abs_pos_embed

    from funai_common.cli import timm_patch_features
    from funai_common.vit import dino_interpolate

    args = dict(patch_size=8, depth=1, embed_dim=24, num_heads=2)
    # saved with a 2x2 patch grid, evaluated with 4x4: the 2x2 table, DINO-interpolated at every forward
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, num_classes=0, **args)
    state = {f"backbone.{k}": v for k, v in small.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    fn, patch = timm_patch_features("vit_tiny_patch16_224", 32, checkpoint=tmp_path / "w.safetensors", **args)
    big = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, **args).eval()
    expected = dict(small.state_dict())
    table = small.pos_embed.detach()
    expected["pos_embed"] = torch.cat([table[:, :1], dino_interpolate(table[:, 1:], (4, 4))], 1)
    big.load_state_dict(expected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), big.forward_features(x)[:, 1:])
    assert patch == 8
    # img_size given: the table is resampled to it at load (timm), then used as it is at that size
    fn, _ = timm_patch_features("vit_tiny_patch16_224", 32, checkpoint=tmp_path / "w.safetensors", img_size=32, **args)
    expected["pos_embed"] = resample_abs_pos_embed(table, (4, 4), num_prefix_tokens=1)
    big.load_state_dict(expected)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), big.forward_features(x)[:, 1:])


def test_model_args_read_exponents_as_floats():
    from funai_common.cli import _parse_kwargs

    assert _parse_kwargs(["drop_path_rate=1e-1", "depth=2", "name=e5"]) == {
        "drop_path_rate": 0.1,
        "depth": 2,
        "name": "e5",
    }


@pytest.mark.slow
def test_hummingbird_cli_on_synthetic_data_with_a_tiny_vit(tmp_path):
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=1,
        embed_dim=24,
        num_heads=2,
        num_classes=0,
    )
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "hb.json"
    result = hummingbird_main(
        [
            "--model",
            "vit_tiny_patch16_224",
            "--checkpoint",
            str(tmp_path / "w.safetensors"),
            "--model-args",
            "patch_size=8",
            "depth=1",
            "embed_dim=24",
            "num_heads=2",
            "--dataset",
            "synthetic",
            "--input-size",
            "32",
            "--augmentation-epochs",
            "1",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert 0.0 <= result["miou"] <= 1.0 and json.loads(out.read_text())["miou"] == result["miou"]


def test_hummingbird_cli_names_the_missing_dataset_or_model(tmp_path, monkeypatch):
    import timm

    from funai_common.cli import timm_patch_features

    # a missing dataset is reported before the model is built (here it could not be)
    with pytest.raises(FileNotFoundError, match="VOCSegmentation.*layout"):
        hummingbird_main(
            ["--model", "no_such_vit", "--dataset", "voc", "--data-dir", str(tmp_path / "VOCSegmentation")]
        )
    with pytest.raises(ValueError, match="--model 'no_such_vit': not a timm model name"):
        timm_patch_features("no_such_vit", 32, pretrained=False)

    def offline(*args, **kwargs):  # what timm raises when the weights are neither cached nor downloadable
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"'vit_small_patch14_dinov2.lvd142m' .* --checkpoint PATH"):
        timm_patch_features("vit_small_patch14_dinov2.lvd142m", 504)
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed: an ImportError traceback before
    with pytest.raises(ValueError, match=r"^funai-hummingbird --model needs timm: pip install"):
        timm_patch_features("vit_small_patch14_dinov2.lvd142m", 504)


def test_hummingbird_cli_passes_file_sets_fraction_ignore_index_and_fp16_bank(tmp_path, monkeypatch):
    from PIL import Image

    from funai_common import cli

    root = tmp_path / "VOCSegmentation"
    (root / "sets").mkdir(parents=True)
    (root / "sets" / "trainaug.txt").write_text("a\nb\nc\nd\n")
    (root / "sets" / "val.txt").write_text("e\nf\n")
    for name, folder in [*((n, "SegmentationClassAug") for n in "abcd"), *((n, "SegmentationClass") for n in "ef")]:
        for path, mode in ((root / "images" / f"{name}.jpg", "RGB"), (root / folder / f"{name}.png", "L")):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new(mode, (8, 8)).save(path)
    (tmp_path / "train_fs.txt").write_text("b\nd\nc\n")
    (tmp_path / "val_fs.txt").write_text("f\n")
    seen = {}

    class FakeEvaluator:
        def __init__(self, feature_fn, train, val, *args, **kwargs):
            seen.update(train=[p.stem for p, _ in train.pairs], val=[p.stem for p, _ in val.pairs], **kwargs)

        def evaluate(self):
            return {"miou": 0.5, "per_class_iou": [], "memory_rows": 1}

    monkeypatch.setattr(cli, "timm_patch_features", lambda *a, **k: (None, 8))
    monkeypatch.setattr(cli, "HummingbirdEvaluator", FakeEvaluator)
    base = ["--model", "m", "--dataset", "voc", "--data-dir", str(root), "--input-size", "8"]
    hummingbird_main([*base, "--train-fs", str(tmp_path / "train_fs.txt"), "--val-fs", str(tmp_path / "val_fs.txt")])
    assert seen["train"] == ["b", "c", "d"] and seen["val"] == ["f"]
    assert seen["ignore_index"] is None and seen["bank_dtype"] is None  # defaults: the dataset's index, float32
    seen.clear()
    hummingbird_main([*base, "--train-fraction", "0.5", "--ignore-index", "0", "--bank-fp16"])
    assert len(seen["train"]) == 2 and set(seen["train"]) <= set("abcd") and seen["val"] == ["e", "f"]
    assert seen["ignore_index"] == 0 and seen["bank_dtype"] == torch.float16


@pytest.mark.slow
def test_demo_quick(tmp_path):
    metrics = demo.main(["--out", str(tmp_path), "--quick"])
    assert metrics["colour features"]["hummingbird_miou"] > 90
    assert (tmp_path / "hummingbird.png").stat().st_size > 0
    assert set(json.loads((tmp_path / "summary.json").read_text())) >= {"colour mIoU", "noise mIoU"}


def test_checkpoint_of_another_patch_size_is_refused(tmp_path):
    import timm

    from funai_common.cli import timm_patch_features

    args = dict(depth=1, embed_dim=24, num_heads=2)
    p16 = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, **args)
    save_file(p16.state_dict(), str(tmp_path / "p16.safetensors"))
    with pytest.raises(ValueError, match=r"patch size \(16, 16\) differs from the model's \(8, 8\)"):
        timm_patch_features("vit_tiny_patch16_224", 32, checkpoint=tmp_path / "p16.safetensors", patch_size=8, **args)


def test_training_checkpoints_with_args_need_torch_2_5(tmp_path, monkeypatch):
    """Without torch.serialization.safe_globals (torch < 2.5) plain files still load; argparse args are refused."""
    torch.save({"teacher": {"w": torch.ones(1)}}, tmp_path / "plain.pth")
    torch.save({"teacher": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "args.pth")
    monkeypatch.delattr(torch.serialization, "safe_globals")
    assert list(load_state_dict(tmp_path / "plain.pth")) == ["w"]
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_state_dict(tmp_path / "args.pth")


def test_an_error_in_a_data_loader_worker_is_printed_as_its_own_one_line():
    from torch.utils.data import DataLoader, Dataset

    from funai_common.cli import _run

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError("x.jpg is not a readable image (garbage); remove or replace the file")

    with pytest.raises(SystemExit) as exit_:
        _run(lambda: list(DataLoader(Broken(), num_workers=1)), "funai-knn")
    assert exit_.value.code == "funai-knn: error: x.jpg is not a readable image (garbage); remove or replace the file"


def test_knn_cli_unusable_faiss_backend_is_a_one_line_error(tmp_path, monkeypatch):
    from funai_common import search

    np.save(tmp_path / "f.npy", np.zeros((4, 2), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.zeros(4, dtype=np.int64))
    files = ["--train", "f.npy", "--train-labels", "y.npy", "--test", "f.npy", "--test-labels", "y.npy", "--k", "1"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(search, "_faiss", lambda: None)  # faiss not installed: an ImportError traceback before
    for backend, match in (("faiss-cpu", r"needs faiss: pip install"), ("faiss-gpu", r"needs a GPU build of faiss")):
        monkeypatch.setattr("sys.argv", ["funai-knn", *files, "--backend", backend])
        with pytest.raises(SystemExit, match=rf"^funai-knn: error: backend '{backend}' {match}"):
            knn_cli()
