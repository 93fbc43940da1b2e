import json
import os
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from funai_common.datasets import SyntheticSegmentation
from neco.eval import backbone_from_checkpoint, format_table
from neco.eval import main as eval_main
from neco.evaluation import linear_segmentation, overclustering
from neco.export import main as export_main
from neco.train import main as train_main


class _Colours:
    """Images whose pixel colours encode the class exactly (a perfect feature exists)."""

    num_classes, ignore_index = 3, 255

    def __init__(self, n=6, size=32):
        rng = np.random.default_rng(0)
        self.items = []
        for _ in range(n):
            mask = np.zeros((size, size), np.uint8)
            mask[: size // 2] = rng.integers(1, 3)
            mask[size // 2 :, : size // 2] = 255  # ignored region
            colour = np.where(mask == 255, 0, mask)  # ignored pixels look like class 0
            rgb = np.stack([colour == c for c in (0, 1, 2)], -1).astype(np.uint8) * 255
            self.items.append((Image.fromarray(rgb), Image.fromarray(mask)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _colour_features(images):
    # 8 x 8 patches of 4 px, mean colour per patch as the feature (class borders fall on patch borders)
    return torch.nn.functional.avg_pool2d(images, 4).flatten(2).transpose(1, 2)


def test_linear_segmentation_and_overclustering_on_separable_features():
    ds = _Colours()
    lin = linear_segmentation(
        _colour_features,
        ds,
        ds,
        3,
        patch_size=4,
        input_size=32,
        mask_size=16,
        epochs=30,
        lr=0.5,
        milestones=[25],
        batch_size=6,
        progress=False,
    )
    assert lin["miou"] > 0.95
    over = overclustering(
        _colour_features,
        ds,
        3,
        patch_size=4,
        ks=[3, 6],
        input_size=32,
        mask_size=16,
        pca_dim=3,
        seeds=[0, 1],
        niter=20,
        nredo=2,
        progress=False,
    )
    # 3 colours -> K=3 recovers the classes (Hungarian matching), K=6 as well (many-to-one matching)
    assert over["K=3"]["miou"] > 0.95 and over["K=6"]["miou"] > 0.95
    assert len(over["K=3"]["per_seed"]) == 2


def test_eval_masks_follow_the_reference_two_step_nearest_resize():
    # reference (linear_finetune.py / eval_overcluster.py): T.Resize((input, input), NEAREST) on the PIL mask, then
    # F.interpolate(mode="nearest") to 100 x 100. PIL's nearest takes source pixel floor((a + 0.5) * in / out),
    # torch's floor(i * in / out); a mask holding its column index (rows: its row index) shows which pixel is kept.
    from neco.evaluation import _SegTransform

    side, input_size, mask_size = 70, 98, 28
    cols = np.tile(np.arange(side, dtype=np.uint8), (side, 1))
    data = [
        (Image.new("RGB", (side, side)), Image.fromarray(cols)),
        (Image.new("RGB", (side, side)), Image.fromarray(cols.T.copy())),
    ]
    expected = [int(((int(i * input_size / mask_size)) + 0.5) * side / input_size) for i in range(mask_size)]
    for k, key in enumerate(("columns", "rows")):
        _, mask = _SegTransform(data, input_size, mask_size, train=False)[k]
        assert mask.shape == (mask_size, mask_size)
        got = mask[0].tolist() if key == "columns" else mask[:, 0].tolist()
        assert got == expected, key
    assert expected[:3] == [0, 2, 5]  # a direct resize to 28 would keep pixels 1, 3, 6 (cell centres)


def test_overclustering_random_features_score_low():
    ds = _Colours()
    gen = torch.Generator().manual_seed(0)

    def noise(images):
        return torch.randn(images.shape[0], 64, 8, generator=gen)

    over = overclustering(
        noise,
        ds,
        3,
        patch_size=4,
        ks=[3],
        input_size=32,
        mask_size=16,
        pca_dim=4,
        seeds=[0],
        niter=10,
        nredo=1,
        progress=False,
    )
    assert over["K=3"]["miou"] < 0.8


def test_overclustering_matching_and_standardised_features_by_hand(monkeypatch):
    # 5 images of 2 x 2 patches (4 px); per patch block: (ground-truth class, cluster id for K=2, cluster id for K=3)
    blocks = [(0, 0, 0)] * 6 + [(0, 1, 0)] * 2 + [(0, 1, 2)] * 4 + [(0, 1, 1)] * 3 + [(1, 1, 1)] * 2 + [(255, 0, 2)] * 3
    gt, ids = np.array([b[0] for b in blocks]), {k: np.array([b[k - 1] for b in blocks]) for k in (2, 3)}
    masks = np.kron(gt.reshape(5, 2, 2), np.ones((4, 4), np.uint8)).astype(np.uint8)  # (5, 8, 8)
    data = [(Image.new("RGB", (8, 8)), Image.fromarray(mask)) for mask in masks]
    features = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 10.0, 100.0])

    def fake_kmeans(x, k, seed, niter, nredo):
        # standardised then PCA-rotated (all 3 components kept): every feature contributes variance 1
        assert x.shape == (20, 3) and x.var(0).sum() == pytest.approx(3.0, rel=1e-4)
        return ids[k]

    monkeypatch.setattr("neco.evaluation._kmeans", fake_kmeans)
    over = overclustering(
        lambda images: features[: len(images)],
        data,
        2,
        4,
        ks=[2, 3],
        input_size=8,
        mask_size=8,
        seeds=[0],
        progress=False,
    )
    # K = 2 = classes, Hungarian on IoU. Blocks (class, cluster): (0,0) 6, (0,1) 9, (1,1) 2. Cluster 0 -> class 0,
    # 1 -> 1: IoUs 6/15, 2/11 (mean .291); the swap has more true positives (9 vs 8) but IoUs 9/17, 0 (mean .265);
    # many-to-one would send both clusters to class 0: 15/17, 0
    assert over["K=2"]["miou"] == pytest.approx((6 / 15 + 2 / 11) / 2)
    # K = 3 > classes, many-to-one on counts: cluster 1 holds 3 blocks of class 0 and 2 of class 1 (all of class 1's)
    # and goes to class 0 like the others: IoUs 15/17, 0; by share of each class it would go to class 1
    assert over["K=3"]["miou"] == pytest.approx(15 / 17 / 2)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("neco_run")
    train_main(
        [
            "--config",
            "tiny",
            f"train.run_dir={run}",
            "optim.max_steps=1",
            "data.synthetic_images=4",
            "optim.batch_size=2",
            "data.num_local=2",
        ]
    )
    return str(run)


def test_eval_main_on_checkpoint(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    metrics = eval_main(
        [
            "--config",
            "eval_tiny",
            f"checkpoint={trained_run}",
            f"output={out}",
            "data.synthetic_images=4",
            "linear.epochs=1",
            "overcluster.seeds=1",
            "hummingbird.augmentation_epochs=1",
        ]
    )
    printed = capsys.readouterr().out
    assert "Dense NN retrieval" in printed and "neco_tiny (measured)" in printed
    saved = json.load(open(out / "metrics.json"))
    assert set(saved["summary_percent"]) == {"hummingbird", "linear", "overcluster_k5", "overcluster_k12"}
    assert all(0 <= v <= 100 for v in metrics["summary_percent"].values())
    # the memory set is recorded (synthetic data: 4 train images, no file set)
    assert {k: saved["hummingbird"][k] for k in ("memory_images", "train_file_set", "train_fraction")} == {
        "memory_images": 4,
        "train_file_set": None,
        "train_fraction": 1.0,
    }
    assert saved["linear"]["train_images"] == 4  # synthetic data: all of them (COCO: 10 %)


def test_export_loads_into_plain_timm(trained_run, tmp_path):
    info = export_main([f"checkpoint={trained_run}", f"output={tmp_path / 'b.safetensors'}"])
    model = timm.create_model(
        info["timm_name"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay={"file": info["output"]},
        **info["create_kwargs"],
    )
    ours, _ = backbone_from_checkpoint(trained_run, "student")
    x = torch.randn(1, 3, 98, 98)
    torch.testing.assert_close(model.eval().forward_features(x), ours.eval().forward_features(x))
    with pytest.raises(KeyError, match=r"unknown config key 'weight' \(did you mean weights\?\)"):
        export_main([f"checkpoint={trained_run}", "weight=teacher"])


def test_export_and_eval_refuse_unreadable_or_misplaced_files(trained_run, tmp_path):
    # a truncated checkpoint file, an output that is not a .safetensors name (its JSON would overwrite <stem>.json),
    # an eval output that is an existing file, a misspelt timm kwarg: ValueErrors naming them, nothing written
    broken = tmp_path / "ckpt"
    shutil.copytree(os.path.join(trained_run, "checkpoints", "step_000001"), broken)
    (broken / "student.safetensors").write_bytes((broken / "student.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"ckpt/student.safetensors is not a readable safetensors file"):
        export_main([f"checkpoint={broken}", f"output={tmp_path / 'b.safetensors'}"])
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match=r"output='.*notes.txt': expected a file name ending in .safetensors"):
        export_main([f"checkpoint={trained_run}", f"output={tmp_path / 'notes.txt'}"])
    assert (tmp_path / "notes.json").read_text() == "{}"
    (tmp_path / "metrics.json").write_text("{}")
    args = ["--config", "eval_tiny", f"checkpoint={trained_run}", "evals=[hummingbird]"]
    with pytest.raises(ValueError, match=r"output='.*metrics.json' is a file; expected a directory"):
        eval_main([*args, f"output={tmp_path / 'metrics.json'}"])
    with pytest.raises(ValueError, match=r"model.overrides=\{.*'drop_rate_typo': 0.1\} do not fit model.name="):
        eval_main(["--config", "eval_tiny", "model.overrides={drop_rate_typo: 0.1}", f"output={tmp_path / 'o'}"])


def test_format_table_with_paper_row():
    table = format_table(
        "neco_dinov2r_vits14", {"hummingbird": 80.0, "linear": 81.0, "overcluster_k500": 68.0}, (68.9, 80.7, 81.5)
    )
    assert "| neco_dinov2r_vits14 (paper) | 68.9 | 80.7 | 81.5 |" in table
    assert "| neco_dinov2r_vits14 (measured) | 68.0 | 80.0 | 81.0 |" in table


def test_demo_quick(tmp_path):
    from neco.demo import main as demo_main

    summary = demo_main(["--quick", "--out", str(tmp_path)])
    assert os.path.isfile(tmp_path / "nn_maps.png") and os.path.isfile(tmp_path / "loss.png")
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved == summary and 3 <= len(saved) <= 6
    assert 0 <= saved["Hummingbird mIoU after (%)"] <= 100
    # a second, shorter run into the same folder reports its own run: its 2 logged losses and its step-2 model, not
    # the first run's step-3 checkpoint and appended log lines
    demo_main(["--quick", "--steps", "2", "--out", str(tmp_path)])
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert len(metrics["losses_logged"]) == 2
    assert metrics["checkpoints"][-1].endswith("step_000002")


def test_demo_refuses_a_file_as_out_and_no_steps(tmp_path, capsys):
    from neco.demo import main as demo_main

    (tmp_path / "out.json").write_text("{}")
    for argv, message in (
        (["--out", str(tmp_path / "out.json")], "out.json is a file; expected a folder"),
        (["--steps", "0", "--out", str(tmp_path)], "--steps must be a positive integer, got 0"),
    ):
        with pytest.raises(SystemExit):
            demo_main(["--quick", *argv])
        assert message in capsys.readouterr().err


def test_synthetic_dataset_is_used_for_training_images():
    from neco.data import build_image_dataset

    ds = build_image_dataset({"dataset": "synthetic", "synthetic_images": 3, "synthetic_size": 64, "synthetic_seed": 0})
    ref = SyntheticSegmentation(num_images=3, image_size=64, seed=0)
    assert len(ds) == 3 and np.array_equal(np.asarray(ds[1]), np.asarray(ref[1][0]))


def test_eval_missing_voc_fails_before_loading_weights(tmp_path):
    # the default model is pretrained=True: a download attempt would fail differently (offline machine)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        eval_main([f"data.root={tmp_path / 'nowhere'}", f"output={tmp_path / 'out'}"])


def test_eval_num_classes_must_match_a_real_dataset(tmp_path):
    root = tmp_path / "VOCSegmentation"
    (root / "sets").mkdir(parents=True)
    for split in ("trainaug", "val"):
        (root / "sets" / f"{split}.txt").write_text("a\n")
    (root / "images").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "a.jpg")
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (root / folder).mkdir()
        Image.new("L", (8, 8), 15).save(root / folder / "a.png")
    with pytest.raises(ValueError, match=r"data.num_classes=5 but voc has 21 classes"):
        eval_main([f"data.root={root}", "data.num_classes=5", f"output={tmp_path / 'out'}"])


def test_eval_default_train_split_fits_every_dataset(tmp_path):
    # README: `neco-eval ... data.dataset=ade20k data.root=/data/ADEChallengeData2016`; VOC's "trainaug" does not exist
    # there, the training split is ADE's "training" folder (split "train")
    from neco.config import load_config
    from neco.eval import _datasets

    root = tmp_path / "ADEChallengeData2016"
    for folder, count in (("training", 3), ("validation", 2)):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8)).save(root / "images" / folder / f"ADE_{i}.jpg")
            Image.new("L", (8, 8), 3).save(root / "annotations" / folder / f"ADE_{i}.png")
    cfg = load_config(["data.dataset=ade20k", f"data.root={root}"], default="eval_voc")
    train, val, num_classes, ignore = _datasets(cfg)
    assert (len(train), len(val), num_classes, ignore) == (3, 2, 151, 0)
    # VOC keeps its SBD-augmented training list
    voc = tmp_path / "VOCSegmentation"
    (voc / "sets").mkdir(parents=True)
    (voc / "sets" / "trainaug.txt").write_text("a\nb\n")
    (voc / "sets" / "val.txt").write_text("a\n")
    (voc / "images").mkdir()
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (voc / folder).mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(voc / "images" / f"{name}.jpg")
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            Image.new("L", (8, 8), 1).save(voc / folder / f"{name}.png")
    train, val, num_classes, _ = _datasets(load_config([f"data.root={voc}"], default="eval_voc"))
    assert (len(train), len(val), num_classes) == (2, 1, 21)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evals=[hummingbrd]", r"evals=\['hummingbrd'\]: expected a non-empty list of"),
        ("evals=[]", r"evals=\[\]: expected a non-empty list of"),
        ("device=gpu", r"device='gpu': expected auto, cpu or cuda"),
    ],
)
def test_eval_bad_evals_or_device_is_a_clear_error(tmp_path, override, message):
    # a misspelt evaluation used to run nothing and print an empty row; device=gpu was a torch traceback
    with pytest.raises(ValueError, match=message):
        eval_main(["--config", "eval_tiny", override, f"output={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_eval_synthetic_data_with_the_default_num_classes(tmp_path):
    # eval_voc's data.num_classes is null ("the dataset's"); synthetic data then keeps its own 5 classes instead of
    # failing inside SyntheticSegmentation with a TypeError
    from neco.config import load_config
    from neco.eval import _datasets

    cfg = load_config(["data.dataset=synthetic", "data.root=null", "data.synthetic_images=2"], default="eval_voc")
    train, val, num_classes, _ = _datasets(cfg)
    assert (len(train), len(val), num_classes) == (2, 2, 5)


def test_train_augmentation_crops_and_flips_image_and_mask_together():
    from neco.evaluation import _SegTransform

    image = np.zeros((24, 40, 3), np.uint8)
    image[:, :20, 0] = 255  # red left half: class 1, blue right half: class 2 (crops keep >= 24 of the 40 columns)
    image[:, 20:, 2] = 255
    mask = np.where(np.arange(40) < 20, 1, 2).astype(np.uint8)[None].repeat(24, 0)
    pairs = [(Image.fromarray(image), Image.fromarray(mask))] * 16
    data = _SegTransform(pairs, input_size=20, mask_size=20, train=True, seed=0)
    flipped = 0
    for i in range(len(data)):
        tensor, target = data[i]
        red = tensor[0] > 0  # normalised red channel: > 0 on the red stripe only
        assert set(target.unique().tolist()) == {1, 2}
        assert ((target == 1) == red).float().mean() > 0.9, i  # a column of blur at the edge at most
        flipped += bool(target[:, -1].eq(1).all())
    assert 0 < flipped < len(data)  # some samples were flipped, some not
