"""counting-demo: UnCounTR end to end on CPU in a few minutes, no downloads.

Procedural objects with exact masks (shapes x colours = "clusters") are pasted on noise and scikit-image
backgrounds with the real self-collage sampler; a tiny random frozen ViT plays DINO; the feature interaction module
and the density decoder are trained on the collages (backbone features cached once, since the backbone is frozen);
the held-out collages use unseen object instances. Reports MAE against the predict-the-mean baseline and counts
scikit-image's ``coins()`` (24 coins) from three coin exemplars with the full test protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from counting.collage import CollageConfig, SelfCollageGenerator
from counting.config import make_dir, run_cli
from counting.data import prepare_test_image
from counting.eval import density_fn_for
from counting.figures import save_density_figure
from counting.inference import count_image
from counting.losses import density_mse_loss
from counting.models import UnCounTR, build_backbone
from counting.synthetic import synthetic_backgrounds, synthetic_object_pool

COIN_BOXES = torch.tensor([[25.0, 104.0, 67.0, 146.0], [134.0, 179.0, 174.0, 217.0], [220.0, 241.0, 269.0, 288.0]])
"""Three coins of ``skimage.data.coins()`` (xyxy pixels; bounding boxes of Otsu-thresholded coins)."""
COINS_TRUE_COUNT = 24

FULL = {"train": 1536, "test": 256, "steps": 900, "batch": 16, "types": 12, "per_type": 24}
QUICK = {"train": 48, "test": 16, "steps": 12, "batch": 8, "types": 6, "per_type": 20}


def make_collages(generator: SelfCollageGenerator, n: int, seed: int) -> list[dict]:
    """``n`` self-collages; collage i is drawn with ``np.random.default_rng([seed, i])``."""
    return [generator.sample(np.random.default_rng([seed, i])) for i in range(n)]


@torch.no_grad()
def cache_features(model: UnCounTR, collages: list[dict], batch: int = 32) -> dict[str, torch.Tensor]:
    """Frozen-backbone tokens of the collages and their exemplar tokens (computed once)."""
    tokens, exemplars = [], []
    for i in range(0, len(collages), batch):
        chunk = collages[i : i + batch]
        tokens.append(model.backbone(torch.stack([c["image"] for c in chunk])))
        exemplars.append(model.exemplar_tokens(torch.stack([c["exemplars"] for c in chunk])))
    return {
        "tokens": torch.cat(tokens),
        "exemplars": torch.cat(exemplars),
        "density": torch.stack([c["density"] for c in collages]),
        "count": torch.stack([c["count"] for c in collages]),
    }


def train_head(
    model: UnCounTR, data: dict, steps: int, batch: int, img_size: int, seed: int, lr: float = 3e-3
) -> list[float]:
    """AdamW + warmup/cosine on the cached features; shots k ~ U{1,2,3} per batch as the reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    grid = (img_size // model.patch_size,) * 2
    warmup, losses = max(steps // 10, 1), []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.from_numpy(rng.choice(len(data["tokens"]), size=batch, replace=False))
        shots = int(rng.integers(1, 4))
        pred = model.forward_head(data["tokens"][idx], data["exemplars"][idx, :shots], grid)
        loss = density_mse_loss(pred, data["density"][idx], 0.8, standard_size=img_size, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def predict_counts(model: UnCounTR, data: dict, img_size: int, scaling: float, shots: int = 3) -> torch.Tensor:
    """Counts (N,) of the cached collages: predicted density map sums (first ``shots`` exemplars) / ``scaling``."""
    grid = (img_size // model.patch_size,) * 2
    out = [
        model.forward_head(data["tokens"][i : i + 64], data["exemplars"][i : i + 64, :shots], grid).sum((1, 2))
        for i in range(0, len(data["tokens"]), 64)
    ]
    return torch.cat(out) / scaling


def coins_image() -> torch.Tensor:
    """``skimage.data.coins()`` as a (3, H, W) float tensor in [0, 1] (the grey image repeated over 3 channels)."""
    import skimage.data

    gray = torch.from_numpy(skimage.data.coins().astype(np.float32) / 255.0)
    return gray[None].expand(3, -1, -1).contiguous()


def main(argv: list[str] | None = None) -> dict:
    """Run the demo (train on collages, held-out MAE, coins count), writing to ``--out``; returns the metrics."""
    parser = argparse.ArgumentParser(prog="counting-demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo/counting"))
    parser.add_argument("--quick", action="store_true", help="a much smaller run (< 20 s) for the test suite")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    make_dir(args.out, "--out")  # before training: a file in the way fails at once
    torch.set_num_threads(1)  # small tensors: one thread is faster than two competing ones
    sizes = QUICK if args.quick else FULL
    start = time.time()
    img_size, scaling = 96, 3000.0
    cfg = CollageConfig(img_size=img_size, object_size=48, exemplar_size=32)
    backgrounds = synthetic_backgrounds(num_noise=8, size=128, seed=args.seed)
    train_gen = SelfCollageGenerator(
        synthetic_object_pool(sizes["types"], sizes["per_type"], 48, seed=args.seed), backgrounds, cfg
    )
    test_gen = SelfCollageGenerator(
        synthetic_object_pool(sizes["types"], sizes["per_type"], 48, seed=args.seed + 1000), backgrounds, cfg
    )
    # same object types (clusters) in both pools: the permutation of types depends on the seed, so fix it
    test_gen.objects.cluster_ids = train_gen.objects.cluster_ids
    train = make_collages(train_gen, sizes["train"], args.seed)
    test = make_collages(test_gen, sizes["test"], args.seed + 1)
    torch.manual_seed(args.seed)
    backbone = build_backbone(
        "vit_s_16", pretrained=False, img_size=img_size, patch_size=8, embed_dim=64, depth=2, num_heads=4
    )
    model = UnCounTR(backbone, img_size=img_size, fim_dim=64, fim_depth=2, fim_heads=4, decoder_width=32)
    train_data, test_data = cache_features(model, train), cache_features(model, test)
    losses = train_head(model, train_data, sizes["steps"], sizes["batch"], img_size, args.seed)
    pred = predict_counts(model, test_data, img_size, scaling)
    gt = test_data["count"]
    mean_count = float(train_data["count"].mean())
    mae = float((pred - gt).abs().mean())
    baseline_mae = float((mean_count - gt).abs().mean())

    coins = coins_image()
    item = prepare_test_image(coins, COIN_BOXES, patch_size=8, target_height=img_size, exemplar_size=32)
    coin_count, coin_density = count_image(
        density_fn_for(model, item["exemplars"]), item["image"][None], item["rects"], window=img_size, stride=32
    )
    h, w = item["image"].shape[-2:]
    save_density_figure(
        args.out / "coins_density.png",
        item["image"],
        coin_density,
        coin_count,
        COINS_TRUE_COUNT,
        item["rel_boxes"] * torch.tensor([w, h, w, h]),
        "skimage coins() + 3 exemplars",
    )
    grid = (img_size // model.patch_size,) * 2
    with torch.no_grad():
        example = model.forward_head(test_data["tokens"][:1], test_data["exemplars"][:1], grid)[0]
    boxes = test[0]["boxes"][:3] * img_size
    save_density_figure(
        args.out / "heldout_collage.png", test[0]["image"], example, float(pred[0]), float(gt[0]), boxes, "held-out"
    )
    seconds = time.time() - start
    summary = {
        "held-out MAE": round(mae, 2),
        "mean-baseline MAE": round(baseline_mae, 2),
        "held-out RMSE": round(float(((pred - gt) ** 2).mean().sqrt()), 2),
        "coins count (24)": round(coin_count, 1),
        "train steps": sizes["steps"],
        "seconds": round(seconds, 1),
    }
    metrics = {
        **summary,
        "losses_first_last": [losses[0], losses[-1]],
        "num_train_collages": sizes["train"],
        "num_test_collages": sizes["test"],
        "mean_train_count": mean_count,
        "quick": args.quick,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    width = max(len(k) for k in summary)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in summary.items()))
    return metrics


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "counting-demo")


if __name__ == "__main__":
    cli()
