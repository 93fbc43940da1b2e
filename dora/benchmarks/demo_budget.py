"""How many steps does the DoRA demo need before its learned features beat the random network?

    python benchmarks/demo_budget.py [--epochs 100] [--every 25] [--seed 0] [--device cpu] [--workers 0]
                                     [--cache] [--classes hue|texture] [--out runs/bench/demo_budget] [--score-only]

Trains with the demo's settings (``dora.demo.demo_overrides``: its synthetic video, tiny ViT and batch 16; the
schedules stretched over ``--epochs`` epochs of 16 steps), keeps the teacher every ``--every`` epochs and scores
every kept teacher with the demo's k-NN protocol ([CLS] and mean-pooled patch tokens) against the demo's random
initialisations. ``--classes texture`` runs the object classes of the README's earlier experiment rounds.
``--device cuda`` trains on the GPU (data loading stays on ``--workers`` CPU processes); ``--score-only`` scores the
checkpoints already under ``--out`` (for example of a run stopped by a time limit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from dora.checkpoint import STEP_DIR
from dora.demo import FULL, demo_overrides, knn_accuracy, random_init_accuracy
from dora.models import build_network
from dora.synthetic import CLASS_KINDS, labelled_objects, walking_frames, write_video


def train(args: argparse.Namespace, run_dir: Path) -> None:
    (args.out / "classes.json").write_text(json.dumps(args.classes))  # what --score-only scores against
    frames = walking_frames(FULL["frames"], size=64, num_objects=3, seed=0, classes=args.classes)
    video = write_video(args.out / "walk.mp4", frames, fps=30)
    steps = FULL["steps"]
    overrides = demo_overrides(video, run_dir, FULL["batch"], args.epochs, steps, args.seed) + [
        f"checkpoint_every={steps * args.every}",
        f"keep_every_epochs={args.every}",
        f"data.num_workers={args.workers}",
        f"cpu={args.device == 'cpu'}",
        f"log_every={steps}",
    ]
    if args.cache:  # the video was just rewritten: a cache of an earlier call would hold its frames
        shutil.rmtree(args.out / "frame_cache", ignore_errors=True)
        overrides.append(f"data.cache_dir={args.out / 'frame_cache'}")
    from dora.train import main as train_main

    t0 = time.perf_counter()
    summary = train_main(overrides)
    seconds = time.perf_counter() - t0
    print(f"trained {summary['steps']} steps in {seconds:.0f} s ({summary['steps'] / seconds:.1f} steps/s)")


def score(run_dir: Path, classes: str) -> list[dict]:
    """k-NN of every checkpoint's teacher under ``run_dir``, with the random band; prints a markdown table."""
    ckpts = sorted(
        (p for p in (run_dir / "checkpoints").iterdir() if STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:])
    )
    if not ckpts:
        raise FileNotFoundError(f"no step_* checkpoints under {run_dir / 'checkpoints'}")
    images, labels = labelled_objects(FULL["per_class"], size=32, seed=1, classes=classes)
    cfg = json.loads((ckpts[0] / "state.json").read_text())["config"]
    band = random_init_accuracy(cfg, images, labels)
    logged = {}
    if (run_dir / "metrics.jsonl").exists():
        logged = {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    rows = []
    print("| step | loss | k-NN [CLS] (%) | k-NN mean-pooled (%) |\n|---|---|---|---|")
    for ckpt in ckpts:
        step = int(ckpt.name[5:])
        teacher = build_network(cfg, teacher=True)
        teacher.load_state_dict(load_file(str(ckpt / "teacher.safetensors")))
        acc = {pool: knn_accuracy(teacher.backbone, images, labels, pool=pool) for pool in ("cls", "mean")}
        near = min(logged, key=lambda s: abs(s - step)) if logged else None
        rows.append({"step": step, "loss": logged.get(near, float("nan")), **acc})
        print(f"| {step} | {rows[-1]['loss']:.3f} | {acc['cls']:.1f} | {acc['mean']:.1f} |", flush=True)
    for pool in ("cls", "mean"):
        print(f"random init, {pool}: {np.mean(band[pool]):.1f} ({min(band[pool]):.1f}-{max(band[pool]):.1f}) %")
    (run_dir.parent / "budget.json").write_text(json.dumps({"rows": rows, "random_init": band}, indent=1))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100, help=f"epochs of {FULL['steps']} steps")
    parser.add_argument("--every", type=int, default=25, help="keep and score the teacher every N epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes")
    parser.add_argument("--cache", action="store_true", help="decode the video once to a JPEG frame cache")
    parser.add_argument(
        "--classes", choices=CLASS_KINDS, help="object classes (dora-demo --classes; default hue, or the scored run's)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/demo_budget"))
    parser.add_argument("--score-only", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "train"
    recorded = json.loads((args.out / "classes.json").read_text()) if (args.out / "classes.json").is_file() else None
    if args.score_only and None not in (recorded, args.classes) and args.classes != recorded:
        parser.error(f"--classes {args.classes}: the run under {args.out} was trained on --classes {recorded}")
    args.classes = args.classes or (recorded if args.score_only else None) or "hue"
    if not args.score_only:
        train(args, run_dir)
    return score(run_dir, args.classes)


if __name__ == "__main__":
    main()
