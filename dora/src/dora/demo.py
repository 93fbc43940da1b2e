"""``dora-demo``: DoRA end to end on CPU in a few minutes.

Writes a synthetic walking video with PyAV (textured objects drifting over a scrolling panorama), trains a tiny
ViT with the real ``dora-train`` loop, draws the objects its teacher discovers and tracks, and compares k-NN
accuracy of the learned and the randomly initialised backbone on a small labelled set of the same object classes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dora.config import make_dir, run_cli
from dora.synthetic import CLASS_KINDS, labelled_objects, walking_frames, write_video

FULL = {"frames": 1200, "epochs": 100, "steps": 16, "batch": 16, "per_class": 150}
QUICK = {"frames": 120, "epochs": 1, "steps": 3, "batch": 4, "per_class": 8}


RANDOM_SEEDS = (12345, 0, 1)  # random-init baselines: one seed alone varies by +-4 points on this set


def knn_accuracy(model, images: np.ndarray, labels: np.ndarray, k: int = 20, pool: str = "cls") -> float:
    """Weighted k-NN top-1 (%) of the final-norm CLS token (``pool="cls"``) or of the mean of the patch tokens
    (``pool="mean"``), even-indexed images as the bank, odd ones as queries."""
    from dora.augment import normalize
    from funai_common.knn import knn_classify

    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad():
        tokens = model.eval().forward_features(x)
    f = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
    y = torch.from_numpy(labels)
    return float(knn_classify(f[0::2], y[0::2], f[1::2], y[1::2], k=k, num_classes=int(labels.max()) + 1)["top1"])


def random_init_accuracy(cfg: dict, images: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """k-NN top-1 (%) of randomly initialised backbones of ``cfg`` (one per seed of ``RANDOM_SEEDS``), per pool."""
    from dora.models import build_network

    acc = {"cls": [], "mean": []}
    for seed in RANDOM_SEEDS:
        torch.manual_seed(seed)
        backbone = build_network(cfg, teacher=True).backbone
        for pool in acc:
            acc[pool].append(knn_accuracy(backbone, images, labels, pool=pool))
    return acc


def demo_overrides(video: Path, run_dir: Path, batch: int, epochs: int, steps: int, seed: int) -> list[str]:
    """The ``dora-train`` arguments of the demo: a tiny ViT at 32 px on the synthetic video, CPU, checkpoint at the
    end only (append overrides to change any of them)."""
    return [
        "--config", "tiny", f"run_dir={run_dir}", f"seed={seed}", f"data.videos=[{video}]",
        "data.num_frames=2", "data.step=8",
        f"data.batch_size_per_gpu={batch}", f"optim.epochs={epochs}", f"optim.steps_per_epoch={steps}",
        "optim.warmup_epochs=1", "optim.lr=0.015", "optim.min_lr=1e-5", "optim.momentum_teacher=0.98",
        "optim.freeze_last_layer=1", "augment.precrop_size=56", "augment.global_size=32", "augment.local_size=16",
        "augment.num_local_crops=4", "model.out_dim=1024", "model.head_hidden_dim=256", "model.head_bottleneck_dim=64",
        "model.drop_path_rate=0.0",
        "model.overrides={img_size: 32, patch_size: 8, embed_dim: 64, depth: 3, num_heads: 4}",
        "loss.teacher_temp=0.02", "loss.warmup_teacher_temp=0.02", "tracking.num_objects=2",
        f"checkpoint_every={steps * epochs}", "log_every=4", "keep_checkpoints=1",
        "keep_every_epochs=null",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; writes metrics.json, summary.json, masks.png/mp4 and the training run under ``--out``."""
    parser = argparse.ArgumentParser(prog="dora-demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo/dora")
    parser.add_argument("--quick", action="store_true", help="a < 20 s version (used by the tests)")
    parser.add_argument(
        "--epochs", type=int, help=f"training epochs of {FULL['steps']} steps (default {FULL['epochs']})"
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (the random baselines keep theirs)")
    parser.add_argument(
        "--classes",
        choices=CLASS_KINDS,
        default="hue",
        help="object classes of the video and the labelled set: hue families (default) or textures (README Demo)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny ops: thread synchronisation costs more than it saves on a shared CPU
    p = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        p["epochs"] = args.epochs
    out = make_dir(args.out, "--out")
    t0 = time.perf_counter()
    frames = list(walking_frames(p["frames"], size=64, num_objects=3, seed=0, classes=args.classes))
    video = write_video(out / "walk.mp4", frames, fps=30)

    from dora.models import build_network
    from dora.train import main as train_main
    from dora.visualise import visualise

    run_dir = out / "train"
    cache = out / "frame_cache"
    for earlier in (run_dir, cache):  # the demo's own run and frame cache of an earlier call: dora-train starts afresh
        shutil.rmtree(earlier, ignore_errors=True)
    overrides = demo_overrides(video, run_dir, p["batch"], p["epochs"], p["steps"], args.seed) + [
        f"data.cache_dir={cache}",  # decoded once: seeking the video for every clip would fill the step
        "data.num_workers=1",  # clips prepared on the second core
    ]
    summary = train_main(overrides)
    cfg = json.loads((Path(summary["checkpoint"]) / "state.json").read_text())["config"]
    t_train = time.perf_counter() - t0

    from safetensors.torch import load_file

    teacher = build_network(cfg, teacher=True)
    teacher.load_state_dict(load_file(str(Path(summary["checkpoint"]) / "teacher.safetensors")))
    images, labels = labelled_objects(p["per_class"], size=32, seed=1, classes=args.classes)
    acc = {pool: knn_accuracy(teacher.backbone, images, labels, pool=pool) for pool in ("cls", "mean")}
    acc_rand = random_init_accuracy(cfg, images, labels)
    acc_learned, acc_random = acc["cls"], float(np.mean(acc_rand["cls"]))

    shown = np.stack([frames[i] for i in (0, 8, 16, 24)])
    masks = visualise(teacher.backbone.eval(), shown, out, 32, [0, 1, 2], fps=2, title="DoRA demo: tracked objects")
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = {
        "train_steps": summary["steps"],
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "knn_top1_learned": acc_learned,
        "knn_top1_random_init": acc_random,
        "knn_top1_random_init_per_seed": acc_rand["cls"],
        "knn_top1_learned_meanpool": acc["mean"],
        "knn_top1_random_init_meanpool": float(np.mean(acc_rand["mean"])),
        "knn_top1_random_init_meanpool_per_seed": acc_rand["mean"],
        "random_init_seeds": list(RANDOM_SEEDS),
        "classes": args.classes,
        "mask_fraction": float(masks.mean()),
        "train_seconds": t_train,
        "total_seconds": time.perf_counter() - t0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    lo, hi = min(acc_rand["cls"]), max(acc_rand["cls"])
    summary_flat = {
        "k-NN top-1 learned (%)": round(acc_learned, 1),
        f"k-NN top-1 random init, {len(RANDOM_SEEDS)} seeds (%)": f"{acc_random:.1f} ({lo:.1f}-{hi:.1f})",
        "verdict": "learned beats every random init" if acc_learned > hi else "no win: not above every random init",
        "loss first -> last": f"{losses[0]:.3f} -> {losses[-1]:.3f}",
        "train steps": summary["steps"],
        "runtime (s)": round(metrics["total_seconds"], 1),
    }
    (out / "summary.json").write_text(json.dumps(summary_flat, indent=1))
    print(f"\n{'metric':<38} value")
    for k, v in summary_flat.items():
        print(f"{k:<38} {v}")
    print(f"figure: {out / 'masks.png'}")
    return metrics


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "dora-demo")


if __name__ == "__main__":
    cli()
