"""fungi-demo: k-NN on scikit-learn's digits (1,797 real 8x8 images upsampled to 32 px) with a tiny randomly
initialised timm ViT: embeddings vs embeddings + FUNGI gradient features. CPU, under 3 minutes (--quick: seconds).

    fungi-demo [--out runs/demo/fungi] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fungi.config import run_cli
from fungi.data import digits_split
from fungi.evaluation import accuracy_scores, concat_blocks, format_table, knn_predict
from fungi.extractor import FUNGIExtractor
from fungi.tiny import tiny_timm

# Demo-sized objectives: 32 px inputs make the paper's 49 patch views 81 tiny ones; use 3 x 3 patches and 4 local crops.
DEMO_OPTIONS = {"dino": {"num_local": 4}, "simclr": {"stride_scale": 2, "num_negatives": 64}}
ROWS = [("embeddings",), ("kl",), ("dino",), ("simclr",), ("embeddings", "kl", "dino", "simclr")]


def plot(rows: list[dict], test_images: torch.Tensor, out: Path) -> None:
    """Bar chart of k-NN accuracy per feature set, with a strip of the (upsampled) test digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(9, 4.5))
    ax = fig.add_axes([0.2, 0.12, 0.48, 0.8])
    names = [r["features"] for r in rows]
    values = [r["knn_top1"] for r in rows]
    colors = ["tab:gray"] + ["tab:blue"] * (len(rows) - 2) + ["tab:red"]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), [n.replace("embeddings+", "emb+").replace("+", " + ") for n in names], fontsize=8)
    for i, v in enumerate(values):
        ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("k-NN top-1 (%) on digits, k = 20")
    ax.set_xlim(0, 105)
    ax.set_title("tiny random ViT: embeddings vs FUNGI")
    for i in range(8):
        sub = fig.add_axes([0.74 + 0.12 * (i % 2), 0.74 - 0.2 * (i // 2), 0.1, 0.17])
        sub.imshow(test_images[i, 0].numpy(), cmap="gray")
        sub.axis("off")
    fig.savefig(out / "knn_digits.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; writes metrics.json, summary.json and knn_digits.png to ``--out``."""
    parser = argparse.ArgumentParser(
        prog="fungi-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo/fungi")
    parser.add_argument("--quick", action="store_true", help="100 images, for tests (seconds)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; expected a folder for the demo's outputs")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    train, test = digits_split(size=32, train_per_class=5 if args.quick else None, seed=0)
    if args.quick:
        test = torch.utils.data.Subset(test, range(50))
    options = {k: dict(v) for k, v in DEMO_OPTIONS.items()}
    if args.quick:
        options["simclr"]["num_negatives"] = 4
    extractor = FUNGIExtractor(tiny_timm(), seed=args.seed, objective_options=options, max_views_per_pass=512)
    extractor.setup(train, batch_size=64)
    train_blocks, train_labels = extractor.extract_blocks(train, batch_size=64)
    test_blocks, test_labels = extractor.extract_blocks(test, batch_size=64)
    rows = []
    for combo in ROWS:
        pred = knn_predict(concat_blocks(train_blocks, combo), train_labels, concat_blocks(test_blocks, combo), k=20)
        scores = accuracy_scores(test_labels.numpy(), pred)
        rows.append(
            {"features": "+".join(combo), "knn_top1": scores["top1"], "mean_per_class": scores["mean_per_class"]}
        )
    seconds = time.perf_counter() - start
    print(format_table(rows))
    test_images = torch.stack([test[i][0] for i in range(8)])
    plot(rows, test_images, out)
    with open(out / "metrics.json", "w") as f:
        json.dump({"rows": rows, "train": len(train), "test": len(test), "seconds": seconds}, f, indent=2)
    summary = {
        "kNN top-1 embeddings (%)": round(rows[0]["knn_top1"], 2),
        "kNN top-1 embeddings+FUNGI (%)": round(rows[-1]["knn_top1"], 2),
        "gain (points)": round(rows[-1]["knn_top1"] - rows[0]["knn_top1"], 2),
        "images": len(train) + len(test),
        "seconds": round(seconds, 1),
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return summary


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error for bad input (``main`` returns results)."""
    run_cli(main, "fungi-demo")


if __name__ == "__main__":
    cli()
