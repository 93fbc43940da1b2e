"""`sharelock-demo`: synthetic coloured shapes -> tiny random ViT + tiny random Llama features -> ShareLock training
-> zero-shot accuracy on held-out images against chance, plus a similarity-matrix figure. CPU, no downloads."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from sharelock import eval as evaluate
from sharelock import precompute, train
from sharelock.config import check_output_dir, default_config_path, run_cli
from sharelock.data import eval_transform, load_class_names
from sharelock.models import REFERENCE_TEMPLATE, load_model
from sharelock.store import FeatureStore
from sharelock.synthetic import CLASSES, make_dataset, vocabulary_texts
from sharelock.tiny import save_tiny_backbones


def _spec_args(prefix: str, spec: dict) -> list[str]:
    return [f"{prefix}.{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in spec.items()]


def plot(path: Path, sims: np.ndarray, confusion: np.ndarray, names: list[str], title: str) -> None:
    """Class-mean image/prompt cosine similarities and the confusion matrix, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    for ax, mat, label in ((axes[0], sims, "mean cosine similarity"), (axes[1], confusion, "fraction of images")):
        im = ax.imshow(mat, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel('prompt "A photo of a {class}"' if mat is sims else "predicted class")
        ax.set_ylabel("true class of the images")
        fig.colorbar(im, ax=ax, fraction=0.046, label=label)
    axes[0].set_title("image vs class-prompt similarity")
    axes[1].set_title("zero-shot confusion matrix")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; writes features, the run, metrics.json, similarity.png and summary.json under --out."""
    parser = argparse.ArgumentParser(prog="sharelock-demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo/sharelock")
    parser.add_argument("--quick", action="store_true", help="a much smaller version (< 20 s), for the test suite")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.time()
    out = Path(args.out)
    check_output_dir(out)
    n_train, n_test, steps = (160, 48, 40) if args.quick else (1200, 240, 1500)
    paths = make_dataset(out / "data", n_train=n_train, n_test=n_test, seed=0)
    transform = eval_transform()
    from PIL import Image

    calib = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(paths["images"].iterdir())[:64]])
    vision, language = save_tiny_backbones(out / "backbones", vocabulary_texts(), calib)
    feats = out / "features"
    common = [*_spec_args("vision", vision), *_spec_args("language", language), "num_workers=0", "batch_size=64"]
    precompute.main(
        ["modality=image", "source.type=folder", f"source.path={paths['images']}"]
        + [f"source.captions={paths['captions'][0]}", f"out={feats / 'train_images'}", *common]
    )
    for name, captions in zip(("captions_a", "captions_b"), paths["captions"]):
        precompute.main(
            ["modality=text", "source.type=captions", f"source.path={captions}", f"out={feats / name}", *common]
        )
    precompute.main(
        [
            "modality=image",
            "source.type=labelled",
            f"source.path={paths['test']}",
            f"out={feats / 'test_images'}",
            *common,
        ]
    )
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # the demo's own run of an earlier call: sharelock-train starts afresh
    text_stores = [str(feats / "captions_a"), str(feats / "captions_b")]
    datasets = json.dumps([{"vision": str(feats / "train_images"), "text": text_stores}])
    train_summary = train.main(
        ["--config", str(default_config_path("tiny")), f"run_dir={run}", f"data.datasets={datasets}"]
        + [f"optim.max_steps={steps}", f"checkpoint_every={steps}", "log_every=250"]
        + ([f"val_check_interval={steps // 2}", "optim.warmup_steps=5"] if args.quick else [])
    )
    result = evaluate.main(
        [f"checkpoint={run}", f"features={feats / 'test_images'}", f"class_names={paths['class_names']}"]
        + [f"out={out}", "name=synthetic-shapes"]
    )
    # similarity matrix and confusion matrix with the Python API
    model = load_model(run, load_backbones=True)
    test = FeatureStore(feats / "test_images")
    names = load_class_names(paths["class_names"], test.meta["source"]["classes"])
    classifier = model.zero_shot_classifier(names, [REFERENCE_TEMPLATE])
    sims = (model.encode_image(test.load_all()) @ classifier.t()).numpy()
    labels = test.labels
    class_sims = np.stack([sims[labels == c].mean(0) for c in range(len(names))])
    pred = sims.argmax(1)
    confusion = np.stack(
        [np.bincount(pred[labels == c], minlength=len(names)) / (labels == c).sum() for c in range(len(names))]
    )
    chance = 100.0 / len(CLASSES)
    plot(
        out / "similarity.png",
        class_sims,
        confusion,
        names,
        f"ShareLock demo: zero-shot top-1 {result['top1']:.1f}% (chance {chance:.1f}%)",
    )
    elapsed = time.time() - start
    summary = {
        "zero-shot top-1 (%)": round(result["top1"], 2),
        "zero-shot top-5 (%)": round(result["top5"], 2),
        "chance top-1 (%)": round(chance, 2),
        "train steps": train_summary["step"],
        "best val loss": round(train_summary["best_val_loss"], 4),
        "time (s)": round(elapsed, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n| metric | value |\n|---|---|")
    for key, value in summary.items():
        print(f"| {key} | {value} |")
    print(f"\nfigure: {out / 'similarity.png'}  metrics: {out / 'metrics.json'}")
    return summary


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "sharelock-demo")


if __name__ == "__main__":
    cli()
