"""``neco-demo``: NeCo post-training of a tiny ViT on synthetic segmentation images, on CPU, in minutes.

Trains a few hundred NeCo steps (``configs/tiny.yaml``), scores Hummingbird in-context segmentation before and
after, and draws the nearest-neighbour similarity maps of one query patch before and after. Writes
``<out>/metrics.json``, ``<out>/summary.json``, ``<out>/nn_maps.png`` and ``<out>/loss.png``.

    neco-demo                 # ~3 minutes on 2 CPU cores
    neco-demo --quick         # seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neco.checkpoint import list_checkpoints
from neco.config import run_cli
from neco.eval import backbone_from_checkpoint, feature_function
from neco.train import main as train_main

INPUT = 112  # 8 x 8 patches of 14 px


def _hummingbird(backbone: torch.nn.Module, train_ds, val_ds, num_classes: int) -> float:
    from funai_common.hummingbird import HummingbirdEvaluator

    evaluator = HummingbirdEvaluator(
        feature_function(backbone),
        train_ds,
        val_ds,
        num_classes,
        14,
        input_size=INPUT,
        augmentation_epochs=1,
        num_neighbors=10,
        batch_size=16,
        progress=False,
    )
    return 100.0 * evaluator.evaluate()["miou"]


def _normalised(images) -> torch.Tensor:
    from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD

    arr = (
        torch.stack(
            [torch.from_numpy(np.asarray(im.convert("RGB").resize((INPUT, INPUT)), dtype=np.float32)) for im in images]
        ).permute(0, 3, 1, 2)
        / 255.0
    )
    return (arr - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _similarity_maps(backbone, images, query_image: int, query_patch: int) -> torch.Tensor:
    """Cosine similarity (N, S, S) between one query patch and every patch of every image."""
    with torch.no_grad():
        feats = F.normalize(feature_function(backbone)(_normalised(images)), dim=-1)
    side = int(feats.shape[1] ** 0.5)
    return (feats @ feats[query_image, query_patch]).reshape(len(images), side, side)


def _figure(path: str, images, masks, before, after, query_patch: int, scores: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = before.shape[-1]
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(2.2 * n, 6.8))
    qy, qx = divmod(query_patch, side)
    for j in range(n):
        axes[0, j].imshow(images[j].resize((INPUT, INPUT)))
        axes[0, j].imshow(np.asarray(masks[j].resize((INPUT, INPUT))), alpha=0.25, cmap="tab10", vmin=0, vmax=9)
        for row, maps, label in ((1, before, f"before ({scores[0]:.1f})"), (2, after, f"after ({scores[1]:.1f})")):
            axes[row, j].imshow(maps[j].numpy(), cmap="magma", vmin=-1, vmax=1)
            if j == 0:
                axes[row, j].set_ylabel(label)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    scale = INPUT / side
    axes[0, 0].add_patch(plt.Rectangle((qx * scale, qy * scale), scale, scale, fill=False, color="cyan", lw=2))
    axes[1, 0].add_patch(plt.Rectangle((qx - 0.5, qy - 0.5), 1, 1, fill=False, color="cyan", lw=2))
    axes[0, 0].set_ylabel("image (+ mask)")
    fig.suptitle("cosine similarity of the query patch (cyan) to all patches; Hummingbird mIoU % in brackets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_plot(path: str, losses: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("NeCo loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary dict (also in ``<out>/summary.json``)."""
    from funai_common.datasets import SyntheticSegmentation

    parser = argparse.ArgumentParser(
        prog="neco-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo/neco")
    parser.add_argument("--quick", action="store_true", help="a few steps on a handful of images (< 20 s)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="backbone learning rate (default: tiny.yaml's 1e-4)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; expected a folder for the demo's run and figures")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tic = time.perf_counter()
    steps = args.steps or (3 if args.quick else 200)
    images = 8 if args.quick else 64
    run_dir = os.path.join(args.out, "train")
    # the demo's own training folder starts empty: a previous run's checkpoints and appended metrics.jsonl lines
    # would otherwise be read back as this run's (the latest checkpoint, the loss curve)
    shutil.rmtree(run_dir, ignore_errors=True)
    train_main(
        [
            "--config",
            "tiny",
            f"train.run_dir={run_dir}",
            f"optim.max_steps={steps}",
            "optim.epochs=1000",
            f"data.synthetic_images={images}",
            f"data.synthetic_size={INPUT}",
            "optim.batch_size=2",
            "train.save_initial=true",
            "train.keep_checkpoints=1000",
            f"train.checkpoint_every={steps}",
            "train.log_every=1" if args.quick else "train.log_every=10",
            "data.num_local=2",
        ]
        + ([f"optim.lr_backbone={args.lr}"] if args.lr else [])
    )
    ckpts = list_checkpoints(run_dir)
    start, end = ckpts[0], ckpts[-1]
    # the student, as in the reference's in-training evaluation (the EMA teacher lags far behind in 300 steps)
    before, _ = backbone_from_checkpoint(start, "student")
    after, train_cfg = backbone_from_checkpoint(end, "student")
    before.eval()
    after.eval()
    n_eval = 8 if args.quick else 48
    train_ds = SyntheticSegmentation(num_images=n_eval, image_size=INPUT, seed=10)
    val_ds = SyntheticSegmentation(num_images=n_eval // 2, image_size=INPUT, seed=11)
    scores = (
        _hummingbird(before, train_ds, val_ds, val_ds.num_classes),
        _hummingbird(after, train_ds, val_ds, val_ds.num_classes),
    )
    shown = [val_ds[i] for i in range(min(5, len(val_ds)))]
    imgs, masks = [s[0] for s in shown], [s[1] for s in shown]
    side = INPUT // 14
    small = np.asarray(masks[0].resize((side, side), 0))
    fg = np.flatnonzero(small.reshape(-1) > 0)
    query = int(fg[len(fg) // 2]) if len(fg) else side * side // 2  # a foreground patch of the first image
    _figure(
        os.path.join(args.out, "nn_maps.png"),
        imgs,
        masks,
        _similarity_maps(before, imgs, 0, query),
        _similarity_maps(after, imgs, 0, query),
        query,
        scores,
    )
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    _loss_plot(os.path.join(args.out, "loss.png"), losses)
    summary = {
        "Hummingbird mIoU before (%)": round(scores[0], 2),
        "Hummingbird mIoU after (%)": round(scores[1], 2),
        "NeCo loss, first 5 logs (mean)": round(float(np.mean(losses[:5])), 4),
        "NeCo loss, last 5 logs (mean)": round(float(np.mean(losses[-5:])), 4),
        "steps": steps,
        "seconds": round(time.perf_counter() - tic, 1),
    }
    metrics = {
        "summary": summary,
        "losses_logged": losses,
        "train_config": train_cfg["name"],
        "checkpoints": [start, end],
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    width = max(len(k) for k in summary)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in summary.items()))
    return summary


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "neco-demo")


if __name__ == "__main__":
    cli()
