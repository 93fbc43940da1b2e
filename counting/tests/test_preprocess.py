import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from counting.config import load_config
from counting.pools import FileObjectPool
from counting.preprocess import kmeans, main, saliency_masks

TINY = "{patch_size: 8, embed_dim: 48, depth: 2, num_heads: 2}"


class FakeBackbone:
    """Attention concentrated on a 2 x 2 block of a 4 x 4 patch grid."""

    patch_size = 8

    def __call__(self, images, with_attention=True):
        attention = torch.full((images.shape[0], 2, 16), 0.01)
        grid = attention.view(-1, 2, 4, 4)
        grid[:, :, 1:3, 0:2] = 0.2
        return None, attention


def test_saliency_keeps_the_attended_block():
    masks = saliency_masks(FakeBackbone(), torch.zeros(1, 3, 32, 32), size=32, mass=0.6)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[8:24, 0:16] = True  # patch rows 1-2, columns 0-1
    assert not (masks[0] & ~expected).any() and masks[0, 10:22, 0:14].all()  # bilinear edges round the corners
    rows, cols = torch.where(masks[0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 23, 0, 15)


def test_kmeans_backends_separate_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (30, 4)), rng.normal(5, 0.1, (30, 4))]).astype(np.float32)
    for backend in ("sklearn", "auto"):
        labels, centroids = kmeans(x, 2, backend)
        assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1 and labels[0] != labels[-1]
        assert centroids.shape == (2, 4)


@pytest.fixture
def image_root(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "train" / f"n{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return tmp_path / "train"


def common_args(root, tmp_path):
    return [
        f"image_root={root}",
        f"masks_dir={tmp_path / 'masks'}",
        f"features={tmp_path / 'features'}",
        f"clusters={tmp_path / 'clusters.safetensors'}",
        "backbone=vit_s_16",
        "pretrained=false",
        f"backbone_kwargs={TINY}",
        "input_size=32",
        "mask_size=32",
        "shard_size=4",
        "batch_size=4",
        "num_workers=0",
        "num_clusters=2",
        "kmeans_backend=sklearn",
    ]


def test_masks_and_clusters_resumable(image_root, tmp_path):
    args = common_args(image_root, tmp_path)
    main(["all", *args])
    shards = sorted((tmp_path / "masks").glob("masks_*.safetensors"))
    assert [s.name for s in shards] == ["masks_00000000_00000004.safetensors", "masks_00000004_00000006.safetensors"]
    assert load_file(str(shards[1]))["masks"].shape == (2, 32, 32)
    index = json.loads((tmp_path / "masks" / "index.json").read_text())
    assert len(index["images"]) == 6 and index["method"] == "saliency"
    meta = json.loads((tmp_path / "clusters.json").read_text())
    assert meta["backbone"] == "vit_s_16" and meta["num_clusters"] == "2" and meta["num_images"] == 6
    stamp = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    main(["masks", *args])  # only the missing shard is recomputed
    assert shards[0].stat().st_mtime_ns == stamp and shards[1].is_file()
    pool = FileObjectPool(image_root, tmp_path / "masks", tmp_path / "clusters.safetensors")
    image, mask = pool.load(5)
    assert image.shape == (3, 30, 40) and mask.shape == (32, 32) and len(pool.cluster_ids) == 6


def test_clusters_file_named_after_num_clusters(image_root, tmp_path):
    # before: the default path was kmeans_10000.* whatever num_clusters was, e.g. 3 clusters in kmeans_10000.*
    template = f"clusters={tmp_path / 'clusters' / 'kmeans_{num_clusters}.safetensors'}"
    out = main(["clusters", *common_args(image_root, tmp_path), template, "num_clusters=3"])
    assert out["clusters"] == str(tmp_path / "clusters" / "kmeans_3.safetensors")
    assert load_file(out["clusters"])["centroids"].shape[0] == 3
    assert json.loads((tmp_path / "clusters" / "kmeans_3.json").read_text())["num_clusters"] == "3"
    assert load_config([], default="preprocess")[0]["clusters"].endswith("kmeans_{num_clusters}.safetensors")


def test_masks_from_png_files(image_root, tmp_path):
    files = tmp_path / "selfmask"
    for path in image_root.rglob("*.jpg"):
        target = files / path.relative_to(image_root).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = np.zeros((30, 40), dtype=np.uint8)
        mask[:, :20] = 255
        Image.fromarray(mask).save(target)
    main(["masks", *common_args(image_root, tmp_path), "mask_method=files", f"mask_files={files}"])
    masks = load_file(str(tmp_path / "masks" / "masks_00000000_00000004.safetensors"))["masks"].bool()
    assert masks[:, :, :16].all() and not masks[:, :, 16:].any()


def test_bad_step_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="masks, clusters or all"):
        main(["nope"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["masks", f"image_root={tmp_path / 'none'}"])


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "device='gpu' is not a device"), ("cuda:0", "device='cuda:0' but CUDA is not available")],
)
def test_bad_device_is_named(image_root, tmp_path, device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        main(["masks", *common_args(image_root, tmp_path), f"device={device}"])


def test_resume_refuses_shards_made_with_other_settings(image_root, tmp_path):
    args = common_args(image_root, tmp_path)
    main(["all", *args])
    masks, features = tmp_path / "masks", tmp_path / "features"
    at_masks, at_features = re.escape(str(masks)), re.escape(str(features))
    stamps = {p: p.stat().st_mtime_ns for p in [*masks.glob("*.safetensors"), *features.glob("*.safetensors")]}
    main(["all", *args])  # same settings: resumes, nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(ValueError, match=f"{at_masks}.*max_images.*'6 images.*'5 images.*new output folder"):
        main(["masks", *args, "max_images=5"])
    with pytest.raises(ValueError, match=f"{at_masks}.*backbone='vit_s_16'.*backbone='vit_b_16'"):
        main(["masks", *args, "backbone=vit_b_16"])
    with pytest.raises(ValueError, match=f"{at_masks}.*method='saliency'.*method='files'"):
        main(["masks", *args, "mask_method=files", f"mask_files={tmp_path}"])
    with pytest.raises(ValueError, match=f"{at_features}.*max_images.*'6 images.*'4 images"):
        main(["clusters", *args, "max_images=4"])
    with pytest.raises(ValueError, match=f"{at_features}.*input_size=32.*input_size=64"):
        main(["clusters", *args, "input_size=64"])
    (features / "index.json").unlink()  # a folder from before index.json: the backbone in the shards is checked
    with pytest.raises(ValueError, match=f"{at_features}.*backbone='vit_s_16'.*backbone='vit_b_16'"):
        main(["clusters", *args, "backbone=vit_b_16"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_help_shows_the_steps(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/counting-preprocess", "--help"])
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a console script, not `python -m`
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert (
        out.startswith("usage: counting-preprocess [masks|clusters|all (default)] [--config")
        and "mask_method = 'saliency'" in out
    )


def test_sun397_train_backgrounds_are_all_images_but_the_test_list(tmp_path):
    """The reference's CustomSUN397: train = every SUN397 image not listed in Partitions/Testing_01.txt."""
    from counting.pools import sun397_backgrounds

    names = ["a/abbey/sun_a.jpg", "a/abbey/sun_b.jpg", "b/beach/sun_c.jpg", "b/beach/sun_d.jpg"]
    for name in names:
        (tmp_path / "SUN397" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "SUN397" / name)
    (tmp_path / "Partitions").mkdir()
    (tmp_path / "Partitions" / "Training_01.txt").write_text("/a/abbey/sun_a.jpg\n")
    (tmp_path / "Partitions" / "Testing_01.txt").write_text("/a/abbey/sun_b.jpg\n/b/beach/sun_d.jpg\n")
    rel = lambda pool: sorted(str(p.relative_to(tmp_path / "SUN397")) for p in pool.paths)  # noqa: E731
    assert rel(sun397_backgrounds(tmp_path)) == ["a/abbey/sun_a.jpg", "b/beach/sun_c.jpg"]
    assert rel(sun397_backgrounds(tmp_path, split="test")) == ["a/abbey/sun_b.jpg", "b/beach/sun_d.jpg"]


def test_faiss_kmeans_uses_the_gpus_of_a_gpu_build(monkeypatch):
    """faiss.Kmeans runs on the CPU unless given ``gpu``: with faiss-gpu installed (the ``faiss-gpu`` extra) and a
    visible GPU, the k-means step used to stay on the CPU."""
    import sys
    import types

    calls = []

    class Kmeans:
        def __init__(self, d, k, **kwargs):
            calls.append(kwargs)
            self.centroids = np.zeros((k, d), np.float32)
            self.index = types.SimpleNamespace(search=lambda x, n: (None, np.zeros((len(x), 1), np.int64)))

        def train(self, x):
            pass

    x = np.zeros((4, 2), np.float32)
    gpu_build = types.SimpleNamespace(Kmeans=Kmeans, StandardGpuResources=object, get_num_gpus=lambda: 2)
    monkeypatch.setitem(sys.modules, "faiss", gpu_build)
    kmeans(x, 2, "faiss")
    kmeans(x, 2, "faiss", gpu=False)  # counting-preprocess device=cpu
    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(Kmeans=Kmeans))  # a CPU build
    kmeans(x, 2, "faiss")
    assert [c["gpu"] for c in calls] == [True, False, False]
    assert calls[0]["niter"] == 25 and calls[0]["seed"] == 0


def test_bad_values_unreadable_images_and_output_paths_are_named(image_root, tmp_path):
    """shard_size=0 and num_clusters=0 were Python errors (the latter after every feature was computed), an output
    path under a file a traceback, and so was an unreadable image, which now names its path."""
    args = common_args(image_root, tmp_path)
    with pytest.raises(ValueError, match=r"^shard_size=0: expected a positive number of images per shard"):
        main(["masks", *args, "shard_size=0"])
    with pytest.raises(ValueError, match=r"^num_clusters=0: expected 1 to the number of pool images \(6\)"):
        main(["clusters", *args, "num_clusters=0"])
    assert not (tmp_path / "features").exists()
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match=r"^masks_dir: .*file is a file; expected a folder"):
        main(["masks", *args, f"masks_dir={tmp_path / 'file'}"])
    with pytest.raises(ValueError, match=r"^clusters: .*file is a file; expected a folder"):
        main(["clusters", *args, f"clusters={tmp_path / 'file' / 'kmeans.safetensors'}"])
    assert (tmp_path / "file").read_text() == "kept"
    (image_root / "n0" / "0.jpg").write_bytes(b"not a jpeg" * 20)
    with pytest.raises(ValueError, match=r"n0/0.jpg is not a readable image"):
        main(["masks", *args])
