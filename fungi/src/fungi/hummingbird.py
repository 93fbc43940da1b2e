"""fungi-hummingbird: in-context segmentation (Hummingbird mIoU) of a ViT's patch tokens and of per-patch FUNGI
features, as the paper's fungi-hummingbird experiment (DINO ViT-S/16 at 512 px, Pascal VOC).

fungi-hummingbird data_dir=data/VOCSegmentation               # paper setting: memory 102,400, 30 NN, T = 0.02
fungi-hummingbird --config hummingbird_efficient data_dir=...  # data-efficient setting: 83 images, 8 epochs
fungi-hummingbird --config hummingbird_tiny                    # CPU smoke run on synthetic scenes, seconds

The support bank for the FUNGI negatives is the Hummingbird memory of the plain patch tokens (same size, sampling and
augmentation as the evaluation memory), as the reference builds its support index; 50 % of it is kept at random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fungi.config import resolve, run_cli, save_config
from fungi.models import build_timm
from fungi.patches import PatchFUNGI, PatchTokens
from fungi.runs import resolve_device, setup_logging

DEFAULTS = {
    "name": "hummingbird",
    "run_dir": None,
    "model": "vit_small_patch16_224.dino",
    "pretrained": True,
    "checkpoint": None,
    "model_kwargs": {},
    "dataset": "voc",
    "data_dir": "data/VOCSegmentation",
    "dataset_kwargs": {},
    "train_split": None,
    "val_split": "val",
    "train_limit": None,
    "input_size": 512,
    "memory_size": 102400,
    "augmentation_epochs": 1,
    "num_neighbors": 30,
    "temperature": 0.02,
    "features": ["embeddings", "fungi"],
    "layer": None,
    "latent_dim": 96,
    "num_negatives": 2,
    "negative_fraction": 0.5,
    "loss_temperature": 0.07,
    "loss_variant": "library",
    "seed": 42,
    "device": "auto",
    "backend": "auto",
    "batch_size": 4,
    "num_workers": 4,
}
FEATURES = ("embeddings", "fungi")


def build_datasets(cfg: dict):
    """(train, val) segmentation datasets of the config; ``train_limit`` keeps N training images drawn at random
    (``torch.randperm`` seeded with ``seed``), as the reference's ``num_train_samples``."""
    from funai_common.datasets import build_segmentation_dataset

    name, root, extra = cfg["dataset"], cfg["data_dir"], dict(cfg["dataset_kwargs"])
    train_split = cfg["train_split"] or ("trainaug" if name == "voc" else "train")
    try:
        train = build_segmentation_dataset(name, root, train_split, **extra)
        val = build_segmentation_dataset(name, root, cfg["val_split"], **extra)
    except TypeError as err:  # dataset_kwargs of another dataset (e.g. the tiny config's synthetic scenes)
        if not extra:
            raise
        raise ValueError(f"dataset_kwargs={extra} do not apply to dataset={name!r}: {err}") from None
    if cfg["train_limit"] is not None:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg["seed"]))
        train = torch.utils.data.Subset(train, keep[: int(cfg["train_limit"])].tolist())
    return train, val


def main(argv: list[str] | None = None) -> list[dict]:
    """Evaluate the requested feature types; prints the table and writes ``metrics.json`` under the run folder."""
    from funai_common.hummingbird import HummingbirdEvaluator

    cfg = resolve(argv, DEFAULTS, None)
    bad = sorted(set(cfg["features"]) - set(FEATURES))
    if bad or not cfg["features"]:
        raise ValueError(f"features={cfg['features']}: expected a non-empty subset of {FEATURES}")
    run_dir = Path(cfg["run_dir"] or Path("runs/fungi") / cfg["name"])
    log = setup_logging(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    train, val = build_datasets(cfg)  # a missing dataset fails before any weights are fetched
    device = resolve_device(cfg["device"])
    torch.manual_seed(cfg["seed"])  # random-weight models (tiny config) are reproducible too
    # the stored position table, interpolated at input_size as the protocol's DINO models do
    kwargs = {"dynamic_img_size": True, **cfg["model_kwargs"]}
    model = build_timm(cfg["model"], cfg["pretrained"], cfg["checkpoint"], cfg["input_size"], **kwargs).model
    model.to(device)

    def evaluator(feature_fn, keep: bool = False) -> HummingbirdEvaluator:
        return HummingbirdEvaluator(
            feature_fn,
            train,
            val,
            val.num_classes,
            model.patch_embed.patch_size[0],
            cfg["input_size"],
            cfg["memory_size"],
            cfg["augmentation_epochs"],
            cfg["num_neighbors"],
            cfg["temperature"],
            batch_size=cfg["batch_size"],
            backend=cfg["backend"],
            seed=cfg["seed"],
            device=device,
            num_workers=cfg["num_workers"],
            keep_memory_features=keep,
        )

    tokens = PatchTokens(model).eval()
    plain = evaluator(tokens, keep="fungi" in cfg["features"])
    rows = []
    if "embeddings" in cfg["features"]:
        rows.append({"features": "embeddings", **plain.evaluate()})
    if "fungi" in cfg["features"]:
        plain.build_memory()
        patch_fungi = PatchFUNGI(
            model,
            cfg["layer"],
            cfg["seed"],
            cfg["latent_dim"],
            cfg["loss_temperature"],
            cfg["num_negatives"],
            cfg["negative_fraction"],
            cfg["loss_variant"],
            device,
            cfg["backend"],
        )
        patch_fungi.set_memory(plain.memory_features)
        del plain  # free the token memory and its index before the FUNGI memory is built
        rows.append({"features": "embeddings + FUNGI", **evaluator(patch_fungi).evaluate()})
    table = ["| features | dataset | memory rows | mIoU (%) |", "|---|---|---|---|"]
    table += [f"| {r['features']} | {cfg['dataset']} | {r['memory_rows']} | {100 * r['miou']:.2f} |" for r in rows]
    log.info("\n%s", "\n".join(table))
    with open(run_dir / "metrics.json", "w") as f:
        json.dump({"model": cfg["model"], "dataset": cfg["dataset"], "rows": rows}, f, indent=2)
    return rows


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "fungi-hummingbird")


if __name__ == "__main__":
    cli()
