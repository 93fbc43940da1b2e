"""common-demo: Hummingbird and k-NN on the synthetic segmentation set with three feature functions.

Colour features must segment the flat-coloured shapes almost perfectly; pure noise stays near chance; a tiny randomly
initialised ViT sits in between. Writes metrics.json, summary.json and a figure to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from funai_common.cli import format_table
from funai_common.datasets import SyntheticClassification, SyntheticSegmentation
from funai_common.handcrafted import colour_patch_features
from funai_common.hummingbird import HummingbirdEvaluator
from funai_common.knn import knn_classify
from funai_common.transforms import HummingbirdValTransform

log = logging.getLogger("funai_common.demo")


def _feature_functions(patch_size: int, image_size: int) -> dict:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=image_size,
        patch_size=patch_size,
        depth=2,
        embed_dim=48,
        num_heads=2,
        num_classes=0,
    ).eval()
    num_patches = (image_size // patch_size) ** 2
    noise = torch.Generator().manual_seed(0)
    return {
        "colour features": lambda x: colour_patch_features(x, patch_size),
        "tiny random ViT": lambda x: vit.forward_features(x)[:, vit.num_prefix_tokens :],
        "random noise": lambda x: torch.randn(x.shape[0], num_patches, 48, generator=noise),
    }


def _plot(path: Path, images, masks, predictions: dict, num_classes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["image", "ground truth", *predictions]
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.2 * len(columns), 2.2 * len(images)))
    for r, image in enumerate(images):
        panels = [image, masks[r], *(p[r] for p in predictions.values())]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, **({} if c == 0 else {"cmap": "tab10", "vmin": 0, "vmax": max(9, num_classes)}))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run the demo (Hummingbird mIoU, k-NN top-1 per feature function), writing to ``--out``; returns the metrics."""
    p = argparse.ArgumentParser(prog="common-demo", description=__doc__)
    p.add_argument("--out", default="runs/demo/common")
    p.add_argument("--quick", action="store_true", help="a much smaller run (tests)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size, patch, classes = 64, 8, 5
    n_train, n_val = (12, 6) if args.quick else (96, 32)
    train = SyntheticSegmentation(n_train, size, classes, seed=0, cell=16)
    val = SyntheticSegmentation(n_val, size, classes, seed=1, cell=16)
    to_tensor = HummingbirdValTransform(size)
    shown = [to_tensor(*val[i]) for i in range(min(4, n_val))]
    metrics, rows, predictions = {}, [], {}
    for name, fn in _feature_functions(patch, size).items():
        evaluator = HummingbirdEvaluator(
            fn, train, val, classes, patch, input_size=size, augmentation_epochs=2, batch_size=16, progress=False
        )
        hb = evaluator.evaluate()
        predictions[name] = evaluator.predict(torch.stack([img for img, _ in shown])).numpy()

        def pooled(x, fn=fn):
            return fn(x).mean(1)

        def transform(image):
            return to_tensor(image, image)[0]

        train_f = torch.cat([pooled(transform(im)[None]) for im, _ in SyntheticClassification(train)])
        val_f = torch.cat([pooled(transform(im)[None]) for im, _ in SyntheticClassification(val)])
        train_y = torch.tensor([y for _, y in SyntheticClassification(train)])
        val_y = torch.tensor([y for _, y in SyntheticClassification(val)])
        knn = knn_classify(train_f, train_y, val_f, val_y, k=min(20, n_train), num_classes=classes - 1)
        metrics[name] = {"hummingbird_miou": 100 * hb["miou"], "knn_top1": knn["top1"]}
        rows.append([name, 100 * hb["miou"], knn["top1"]])
    chance = 100.0 / (classes - 1)
    print(format_table(["features", "Hummingbird mIoU (%)", f"k-NN top-1 (%, chance {chance:.0f})"], rows))
    images = [np.array(val[i][0]) for i in range(len(shown))]
    _plot(out / "hummingbird.png", images, [m.numpy() for _, m in shown], predictions, classes)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary = {
        "colour mIoU": round(metrics["colour features"]["hummingbird_miou"], 1),
        "random-ViT mIoU": round(metrics["tiny random ViT"]["hummingbird_miou"], 1),
        "noise mIoU": round(metrics["random noise"]["hummingbird_miou"], 1),
        "colour k-NN top-1": round(metrics["colour features"]["knn_top1"], 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %s", out)
    return metrics


def cli() -> None:
    """Console entry point of common-demo (exit status 0 on success; ``main`` returns the metrics)."""
    main()


if __name__ == "__main__":
    cli()
