import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from dora import eval as dora_eval
from dora import visualise
from dora.config import load_config
from dora.davis import boundary_f, evaluate_davis, jaccard, label_propagation, labels_to_mask
from dora.models import build_network
from dora.synthetic import labelled_objects, write_walking_video

TINY = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}"


def test_region_and_boundary_measures():
    a = np.zeros((40, 40), bool)
    b = np.zeros((40, 40), bool)
    a[0:10, 0:10] = True
    b[0:10, 5:15] = True
    assert jaccard(a, b) == pytest.approx(50 / 150)
    assert jaccard(a, a) == 1.0 and jaccard(a, ~a) == 0.0
    assert boundary_f(a, a) == 1.0
    shifted = np.roll(a, 1, axis=1)  # within the 1-pixel tolerance of a 40x40 image
    assert boundary_f(shifted, a) == 1.0
    far = np.zeros_like(a)
    far[25:35, 25:35] = True
    assert boundary_f(far, a) == 0.0


def test_label_propagation_follows_features():
    # 4 patches in a row; the object (label 1) sits on the patch whose feature is e_1 and moves right each frame
    feats = []
    for t in range(3):
        f = torch.tensor([[0.0, 1.0]] * 4)
        f[t] = torch.tensor([1.0, 0.0])
        feats.append(f)
    first = F.one_hot(torch.tensor([1, 0, 0, 0]), 2).float()
    out = label_propagation(feats, first, grid=(1, 4), topk=1, neighbourhood=0)
    assert [int(o[:, 1].argmax()) for o in out] == [0, 1, 2]


def test_labels_to_mask_rescales_each_channel_like_dino():
    """DINO's norm_mask: channel 0 (.9, .6, .95, .7) -> (.86, 0, 1, .29), channel 1 (.1, .4, .05, .3) -> (.14, 1, 0,
    .71), so the argmax alternates although channel 0 is larger everywhere before rescaling."""
    labels = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.7, 0.3]])
    assert labels_to_mask(labels, (2, 2), 1, (2, 2)).tolist() == [[0, 1], [0, 1]]
    assert labels_to_mask(labels, (2, 2), 2, (4, 4)).shape == (4, 4)


def make_davis(root, num_videos=2, frames=5, size=64):
    (root / "ImageSets" / "2017").mkdir(parents=True)
    names = [f"vid{i}" for i in range(num_videos)]
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names))
    rng = np.random.default_rng(0)
    for name in names:
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        for t in range(frames):
            img = np.full((size, size, 3), 128, np.uint8) + rng.integers(0, 8, (size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            x = 8 + 4 * t
            img[16:40, x : x + 16] = (220, 30, 30)
            mask[16:40, x : x + 16] = 1
            img[44:60, 40:56] = (30, 30, 220)
            mask[44:60, 40:56] = 2
            Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            pal = Image.fromarray(mask, mode="P")
            pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
            pal.save(root / "Annotations" / "480p" / name / f"{t:05d}.png")
    return root


def test_davis_with_colour_features(tmp_path):
    root = make_davis(tmp_path / "DAVIS")

    def colour(x):  # mean colour of each 4x4 patch: enough to follow these objects
        return F.avg_pool2d(x, 4).flatten(2).transpose(1, 2)

    res = evaluate_davis(colour, root, patch_size=4, short_side=64, neighbourhood=4)
    assert set(res["per_video"]) == {"vid0", "vid1"}
    assert res["J-Mean"] > 85 and res["F-Mean"] > 85
    assert res["J&F-Mean"] == pytest.approx((res["J-Mean"] + res["F-Mean"]) / 2)
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        evaluate_davis(colour, tmp_path / "nowhere", patch_size=4)
    # void (255) pixels in the first-frame annotation are background, not object 255 (davis2017-evaluation)
    first = root / "Annotations" / "480p" / "vid0" / "00000.png"
    anno = Image.open(first)
    mask = np.asarray(anno).copy()
    mask[:4] = 255
    voided = Image.fromarray(mask, mode="P")
    voided.putpalette(anno.getpalette())
    voided.save(first)
    res_void = evaluate_davis(colour, root, patch_size=4, short_side=64, neighbourhood=4)
    assert res_void["J&F-Mean"] == pytest.approx(res["J&F-Mean"], abs=1e-9)


def test_eval_main_end_to_end(tmp_path):
    images, labels = labelled_objects(6, size=32, seed=0)
    for split, sl in (("train", slice(0, None, 2)), ("val", slice(1, None, 2))):
        for i, (img, y) in enumerate(zip(images[sl], labels[sl])):
            d = tmp_path / "imgs" / split / f"class{y}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i}.png")
    cfg = load_config(["--config", "tiny"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(
        {k: v.contiguous() for k, v in build_network(cfg, teacher=True).state_dict().items()},
        str(ckpt / "teacher.safetensors"),
    )
    davis = make_davis(tmp_path / "DAVIS", num_videos=1, frames=3)
    m = dora_eval.main(
        [
            f"out_dir={tmp_path / 'out'}",
            f"checkpoint={ckpt}",
            f"model_overrides={TINY}",
            "tasks=[knn, linear, davis]",
            "device=cpu",
            "num_workers=0",
            "batch_size=16",
            f"imagenet.train={tmp_path / 'imgs' / 'train'}",
            f"imagenet.val={tmp_path / 'imgs' / 'val'}",
            "imagenet.resize=32",
            "imagenet.crop=32",
            "knn.ks=[3, 5]",
            "linear.n_last_blocks=2",
            "linear.C=1.0",
            "linear.max_iter=200",
            f"davis.root={davis}",
            "davis.short_side=32",
        ]
    )
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["knn"]["3"]["top1"] == m["knn"]["3"]["top1"]
    assert 0 <= m["linear"]["top1"] <= 100 and 0 <= m["davis"]["J&F-Mean"] <= 100
    with pytest.raises(ValueError, match="lacks backbone weights"):
        bad = tmp_path / "bad.safetensors"
        save_file({"foo": torch.zeros(1)}, str(bad))
        dora_eval.main([f"out_dir={tmp_path / 'o2'}", f"checkpoint={bad}", f"model_overrides={TINY}", "tasks=[]"])


def test_feature_helpers(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    cat = dora_eval.last_blocks_cls(tiny_vit, x, 2)
    assert cat.shape == (2, 64)
    torch.testing.assert_close(cat[:, 32:], dora_eval.cls_features(tiny_vit, x))
    # the last n of the 2 blocks: n=1 is the final CLS alone
    torch.testing.assert_close(dora_eval.last_blocks_cls(tiny_vit, x, 1), dora_eval.cls_features(tiny_vit, x))
    assert dora_eval.patch_features(tiny_vit, x).shape == (2, 16, 32)


def test_eval_bad_device_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="device='gpu': expected auto, cpu, cuda"):
        dora_eval.main([f"out_dir={tmp_path / 'o'}", "device=gpu", "tasks=[]"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA device"):
        dora_eval.main([f"out_dir={tmp_path / 'o'}", "device=cuda", "tasks=[]"])


def test_eval_refuses_train_and_val_with_different_class_folders(tmp_path):
    for split, classes in (("train", "abc"), ("val", "ac")):  # val's "c" would be label 1, train's "b"
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    cfg = load_config(["--config", "tiny"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(
        {k: v.contiguous() for k, v in build_network(cfg, teacher=True).state_dict().items()},
        str(ckpt / "teacher.safetensors"),
    )
    args = [f"out_dir={tmp_path / 'out'}", f"checkpoint={ckpt}", f"model_overrides={TINY}", "tasks=[knn]"]
    args += [f"imagenet.train={tmp_path / 'train'}", f"imagenet.val={tmp_path / 'val'}", "device=cpu"]
    with pytest.raises(ValueError, match=r"class folders of .*train \(3\) and .*val \(2\) differ \(e.g. \['b'\]\)"):
        dora_eval.main(args)


def test_davis_frames_are_resized_like_dino_read_frame(tmp_path):
    """DINO's eval_video_segmentation.read_frame: short side to 480, the other side scaled and floored to a multiple
    of 64 (854 x 480 -> 832 x 480, a 30 x 52 grid at patch 16), with cv2's bilinear (no antialias)."""
    from dora.davis import davis_frame_size

    assert davis_frame_size(854, 480, 480, 16) == (832, 480)
    assert davis_frame_size(480, 854, 480, 16) == (480, 832)
    assert davis_frame_size(500, 500, 480, 16) == (448, 480)  # square: DINO's else branch floors the width

    def write(root, name, img):
        for sub in ("JPEGImages", "Annotations"):
            (root / sub / "480p" / name).mkdir(parents=True)
        for t in range(3):
            Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=100, subsampling=0)
            mask = np.zeros(img.shape[:2], np.uint8)
            mask[: img.shape[0] // 2, : img.shape[1] // 2] = 1
            Image.fromarray(mask, mode="P").save(root / "Annotations" / "480p" / name / f"{t:05d}.png")

    seen = []

    def record(x, patch=16):
        seen.append(x)
        return F.avg_pool2d(x, patch).flatten(2).transpose(1, 2)

    root = tmp_path / "DAVIS480"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("wide")
    write(root, "wide", np.full((480, 854, 3), 100, np.uint8))
    evaluate_davis(record, root, patch_size=16, short_side=480)
    assert {tuple(x.shape) for x in seen} == {(1, 3, 480, 832)}

    # an exact 2x reduction of columns 0, 0, 255, 255, ...: bilinear without antialias averages the pairs (0, 0) and
    # (255, 255), so the columns stay 0 and 1; an antialiased filter would blur them towards 0.25 / 0.75
    seen.clear()
    root = tmp_path / "DAVIS2x"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("stripes")
    stripes = np.zeros((64, 128, 3), np.uint8)
    stripes[:, (np.arange(128) // 2) % 2 == 1] = 255
    write(root, "stripes", stripes)
    evaluate_davis(lambda x: record(x, 4), root, patch_size=4, short_side=32, neighbourhood=0)
    x = seen[0][0] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        3, 1, 1
    )
    assert x.shape == (3, 32, 64)
    cols = x.mean(dim=(0, 1))
    assert (cols[0::2] < 0.05).all() and (cols[1::2] > 0.95).all()


def test_davis_video_too_short_to_score(tmp_path):
    """Two frames leave none to score (first and last excluded): null per video, and an error when no video has one."""
    colour = lambda x: F.avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # noqa: E731
    short = make_davis(tmp_path / "short", num_videos=1, frames=2)
    with pytest.raises(ValueError, match=r"no DAVIS frame to score in the 1 videos of .*val.txt"):
        evaluate_davis(colour, short, patch_size=4, short_side=64, neighbourhood=4)
    mixed = make_davis(tmp_path / "mixed", num_videos=2, frames=4)
    for t in (2, 3):  # vid1 keeps two frames
        (mixed / "JPEGImages" / "480p" / "vid1" / f"{t:05d}.jpg").unlink()
        (mixed / "Annotations" / "480p" / "vid1" / f"{t:05d}.png").unlink()
    res = evaluate_davis(colour, mixed, patch_size=4, short_side=64, neighbourhood=4)
    assert res["per_video"]["vid1"] == {"J": None, "F": None} and res["per_video"]["vid0"]["J"] > 0.85
    assert res["J-Mean"] == pytest.approx(100 * res["per_video"]["vid0"]["J"])


def test_neighbourhood_mask_hand_case():
    from dora.davis import neighbourhood_mask

    m = neighbourhood_mask(2, 3, 1)  # grid rows (0,0) (0,1) (0,2) / (1,0) (1,1) (1,2)
    assert m[0].tolist() == [True, True, False, True, True, False]
    assert m[1].all() and m[4].all()
    assert m[5].tolist() == [False, True, True, False, True, True]
    assert neighbourhood_mask(2, 3, 0).all()


def reference_propagation(feats, first, grid, n_last, topk, size, temperature):
    """DINO's label propagation one target patch at a time: context = frame 0 and the last n_last predictions."""
    h, w = grid
    feats = [F.normalize(f.double(), dim=-1) for f in feats]
    out = [first.double()]
    for t in range(1, len(feats)):
        ctx = [0] + list(range(max(1, t - n_last), t))
        lab = torch.zeros_like(out[0])
        for i in range(h * w):
            cands = [
                (float(torch.exp(feats[t][i] @ feats[s][j] / temperature)), s, j)
                for s in ctx
                for j in range(h * w)
                if size <= 0 or max(abs(i // w - j // w), abs(i % w - j % w)) <= size
            ]
            best = sorted(cands, reverse=True)[:topk]
            total = sum(a for a, _, _ in best)
            for a, s, j in best:
                lab[i] += a / total * out[s][j]
        out.append(lab)
    return out


@pytest.mark.parametrize("n_last, topk, size", [(2, 5, 1), (1, 20, 0), (3, 3, 2)])
def test_label_propagation_matches_a_per_patch_reference(n_last, topk, size):
    g = torch.Generator().manual_seed(n_last)
    grid = (3, 4)
    feats = [torch.randn(12, 6, generator=g) for _ in range(6)]
    first = torch.softmax(3 * torch.randn(12, 3, generator=g), -1)
    got = label_propagation(feats, first, grid, n_last, topk, size, temperature=0.2)
    want = reference_propagation(feats, first, grid, n_last, topk, size, 0.2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_davis_rgb_annotation_and_unreadable_frame_are_errors_naming_them(tmp_path):
    """An RGB annotation failed deep in the propagation (a torch.stack size error), an unreadable frame with PIL's
    traceback."""
    colour = lambda x: F.avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # noqa: E731
    root = make_davis(tmp_path / "DAVIS", num_videos=1, frames=3)
    first = root / "Annotations" / "480p" / "vid0" / "00000.png"
    rgb = Image.open(first).convert("RGB")
    rgb.save(first)
    with pytest.raises(ValueError, match=r"vid0/00000.png has 3 channels; expected a single-channel \(palette\) PNG"):
        evaluate_davis(colour, root, patch_size=4, short_side=64)
    root = make_davis(tmp_path / "DAVIS2", num_videos=1, frames=3)
    (root / "JPEGImages" / "480p" / "vid0" / "00001.jpg").write_bytes(b"not a jpeg" * 20)
    with pytest.raises(ValueError, match=r"DAVIS frame .*vid0/00001.jpg is not a readable image"):
        evaluate_davis(colour, root, patch_size=4, short_side=64)


def test_eval_out_dir_under_a_file_and_unreadable_checkpoints_are_errors(tmp_path):
    """out_dir under a file, a truncated safetensors file and a file that is no PyTorch checkpoint at all (say, the
    HTML page a failed download saves) were tracebacks."""
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match=r"^out_dir: .*file is a file; expected a folder"):
        dora_eval.main([f"out_dir={tmp_path / 'file' / 'eval'}", "tasks=[]"])
    assert (tmp_path / "file").read_text() == "kept"
    base = [f"out_dir={tmp_path / 'out'}", f"model_overrides={TINY}", "tasks=[]"]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "teacher.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"ckpt/teacher.safetensors is not a readable safetensors file"):
        dora_eval.main([*base, f"checkpoint={tmp_path / 'ckpt'}"])
    (tmp_path / "dora_venice_100ep.pth").write_text("<!DOCTYPE html><html><title>Google Drive</title></html>")
    with pytest.raises(ValueError, match=r"dora_venice_100ep.pth: not a checkpoint of plain tensors"):
        dora_eval.main([*base, f"checkpoint={tmp_path / 'dora_venice_100ep.pth'}"])


def test_eval_and_visualise_of_a_run_folder_take_its_latest_complete_checkpoint(tmp_path):
    """A run folder was "teacher.safetensors not found: not a DoRA checkpoint directory?"; neco-eval and
    sharelock-eval take one. A checkpoint left half-written (``.tmp``) is not a candidate."""
    state = build_network(load_config(["--config", "tiny"]), teacher=True).state_dict()
    for name in ("step_000002", "step_000004", "step_000009.tmp"):
        ckpt = tmp_path / "run" / "checkpoints" / name
        ckpt.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "teacher.safetensors"))
        (ckpt / "state.json").write_text("{}")
    base = [f"out_dir={tmp_path / 'out'}", f"model_overrides={TINY}", "tasks=[]"]
    assert dora_eval.main([*base, f"checkpoint={tmp_path / 'run'}"])["checkpoint"].endswith("checkpoints/step_000004")
    video = write_walking_video(tmp_path / "walk.mp4", num_frames=12, size=48)
    vis = [f"video={video}", f"out_dir={tmp_path / 'vis'}", f"model_overrides={TINY}", "size=32", "num_frames=2"]
    info = visualise.main([*vis, "step=5", f"checkpoint={tmp_path / 'run'}"])  # was: not a checkpoint directory
    assert info["checkpoint"].endswith("checkpoints/step_000004")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"run folder .*empty holds no checkpoint under .*empty/checkpoints"):
        dora_eval.main([*base, f"checkpoint={tmp_path / 'empty'}"])


def test_davis_max_videos_must_be_a_positive_integer(tmp_path):
    davis = make_davis(tmp_path / "DAVIS", num_videos=2, frames=3)
    base = [f"model_overrides={TINY}", "tasks=[davis]", "device=cpu", f"davis.root={davis}", "davis.short_side=32"]
    m = dora_eval.main([f"out_dir={tmp_path / 'one'}", *base, "davis.max_videos=1"])
    assert list(m["davis"]["per_video"]) == ["vid0"]
    for bad in ("-1", "0", "two"):  # -1 had scored all videos but the last, 'two' had crashed in a slice
        with pytest.raises(ValueError, match=rf"^davis.max_videos='?{bad}'?: expected a positive integer"):
            dora_eval.main([f"out_dir={tmp_path / 'bad'}", *base, f"davis.max_videos={bad}"])
