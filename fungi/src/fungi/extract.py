"""fungi-extract: FUNGI features (embeddings + projected self-supervised gradients) of a train and a test split, and of
the dataset's own validation split when it has one (DTD, Flowers102, FGVC-Aircraft; the linear probe's lambda).

fungi-extract --config tiny            # shipped config, scikit-learn digits, tiny random ViT (CPU, seconds)
fungi-extract --config paper data.root=/data/flowers102 name=flowers_dino_b16
fungi-extract --config retrieval data.root=/data/revisited data.name=roxford5k   # database + whole queries
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fungi.config import resolve, run_cli, save_config
from fungi.data import build_split, check_data_split, validation_split
from fungi.extractor import FUNGIExtractor
from fungi.models import build_backbone
from fungi.objectives import OBJECTIVES
from fungi.runs import resolve_device, resolve_dtype, save_features, setup_logging

DEFAULTS = {
    "name": "default",
    "run_dir": None,
    "model": "timm:vit_base_patch16_224.dino",
    "pretrained": True,
    "checkpoint": None,
    "model_kwargs": {},
    "input_size": None,
    "layer": None,
    "objectives": ["kl", "dino", "simclr"],
    "seed": 42,
    "device": "auto",
    "dtype": "auto",
    "batch_size": 16,
    "max_views_per_pass": 256,
    "max_length": 512,
    "state": None,
    "splits": ["train", "val", "test"],
    "limit": None,
    "kl": {"temperature": 15.0, "latent_dim": 768},
    "dino": {
        "latent_dim": 2048,
        "student_temperature": 0.1,
        "teacher_temperature": 0.07,
        "num_global": 2,
        "num_local": 10,
        "global_scale": [0.25, 1.0],
        "local_scale": [0.05, 0.25],
    },
    "simclr": {
        "latent_dim": 96,
        "temperature": 0.07,
        "variant": "paper",
        "num_negatives": 256,
        "num_patches": 4,
        "stride_scale": 6,
        "num_text_views": 12,
        "num_negative_text_views": 2,
        "word_drop": 0.1,
        "num_audio_views": 16,
        "num_negative_audio_views": 2,
    },
    "deepcluster": {  # the experiment repo's ablation; add it to `objectives` to use it
        "latent_dim": 128,
        "num_prototypes": 3000,
        "num_heads": 3,
        "temperature": 0.1,
        "num_global": 2,
        "num_local": 6,
        "global_scale": [0.14, 1.0],
        "local_scale": [0.05, 0.14],
        "kmeans_iters": 10,
    },
    "data": {
        "kind": "imagefolder",
        "root": None,
        "name": None,
        "train_split": "train",
        "val_split": "auto",
        "test_split": "val",
        "train_file": None,
        "test_file": None,
        "image_size": 32,
        "train_per_class": None,
        "seed": 0,
        "num_mel_bins": 128,
        "max_length": 1024,
        "crop_queries": False,
    },
}


def build_extractor(cfg: dict) -> FUNGIExtractor:
    """FUNGIExtractor from a resolved config (model, layer, objectives and their options, seed, device, dtype)."""
    device = resolve_device(cfg["device"])
    backbone = build_backbone(
        cfg["model"], cfg["pretrained"], cfg["checkpoint"], cfg["input_size"], **cfg["model_kwargs"]
    )
    return FUNGIExtractor(
        backbone,
        layer=cfg["layer"],
        objectives=cfg["objectives"],
        seed=cfg["seed"],
        device=device,
        dtype=resolve_dtype(cfg["dtype"], device),
        objective_options={name: cfg[name] for name in cfg["objectives"]},
        max_views_per_pass=cfg["max_views_per_pass"],
        max_length=cfg["max_length"],
    )


def check_digits_size(backbone, image_size: int, name: str) -> None:
    """The digits reach the model as tensors of ``data.image_size`` (no resize): a ViT built for a fixed other size
    would stop on timm's assertion deep in the first batch."""
    model = backbone.model
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    fixed = getattr(model.patch_embed, "strict_img_size", False) if built else False
    if fixed and not getattr(model, "dynamic_img_size", False) and tuple(built) != (image_size, image_size):
        raise ValueError(
            f"data.image_size={image_size}: the digits reach the model at that size, but model={name} was built for "
            f"{built[0]}x{built[1]} px; set data.image_size={built[0]} (or model_kwargs.dynamic_img_size=true)"
        )


def limited(dataset, limit: int | None):
    """The first ``limit`` items (all when None)."""
    if not limit or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


def resolve_validation(cfg: dict) -> bool:
    """Resolve ``data.val_split`` in place ('auto' -> the dataset's validation split or None, see
    ``fungi.data.validation_split``) and drop 'val' from ``splits`` when there is none; returns whether it was dropped.
    """
    cfg["data"]["val_split"] = validation_split(cfg["data"])
    if "val" not in cfg["splits"]:
        cfg["data"]["val_split"] = None  # not extracted: the recorded config says so
        return False
    if cfg["data"]["val_split"] is not None:
        return False
    cfg["splits"] = [s for s in cfg["splits"] if s != "val"]
    if not cfg["splits"]:
        raise ValueError("splits=[val] but the dataset has no validation split (data.val_split names one)")
    return True


def negatives_split(splits: list[str]) -> str:
    """The split whose images fill the SimCLR negative bank and fit the DeepCluster prototypes: 'train' (or a
    retrieval 'database') whatever the order of ``splits``, so test, validation or query images never serve as
    negatives or prototypes; else the first split."""
    return next((s for s in ("train", "database") if s in splits), splits[0])


def main(argv: list[str] | None = None) -> Path:
    """Extract features for each split into ``<run_dir>/features.safetensors``; returns that path."""
    cfg = resolve(argv, DEFAULTS, None)
    if not cfg["splits"]:
        raise ValueError("splits is empty; expected e.g. splits=[train,val,test]")
    for key in ("batch_size", "max_views_per_pass"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]!r}: expected a positive integer")
    unknown = sorted(set(cfg["objectives"]) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; expected a subset of {list(OBJECTIVES)}")
    for split in cfg["splits"]:
        check_data_split(cfg["data"], split)
    if cfg["data"]["kind"] == "imagefolder" and not cfg["data"]["root"]:  # the defaults: Path(None) deep in data
        raise ValueError("data.root is not set: give data.root=FOLDER (<root>/<split>/<class>/<image>) or a --config")
    dropped_val = resolve_validation(cfg)
    run_dir = Path(cfg["run_dir"] or Path("runs") / "fungi" / cfg["name"])
    log = setup_logging(run_dir)
    # data first: a missing dataset is reported before any weights are fetched
    datasets = {split: limited(build_split(cfg["data"], split), cfg["limit"]) for split in cfg["splits"]}
    if dropped_val:
        log.info(
            "the dataset has no validation split: 'val' not extracted (fungi-eval's linear probe then chooses "
            "lambda on an 80/20 split of train)"
        )
    torch.manual_seed(cfg["seed"])
    extractor = build_extractor(cfg)
    if cfg["data"]["kind"] == "digits":
        check_digits_size(extractor.backbone, cfg["data"]["image_size"], cfg["model"])
    save_config(cfg, run_dir / "config.yaml")  # once the inputs are checked: a failed run keeps an earlier run's file
    log.info("model %s, layer %s, objectives %s", cfg["model"], extractor.layer, extractor.objective_names)
    backbone = {key: cfg[key] for key in ("model", "pretrained", "checkpoint", "model_kwargs", "input_size")}
    if backbone["checkpoint"]:  # the same weights in another folder are the same model
        backbone["checkpoint"] = Path(backbone["checkpoint"]).name
    loaded = bool(cfg["state"]) and Path(cfg["state"]).is_file()
    if loaded:
        extractor.load(cfg["state"], backbone)
        log.info("loaded heads, projection, negatives and prototypes from %s", cfg["state"])
    else:
        if cfg["state"]:  # a mistyped path would otherwise pass silently with negatives of this run's splits
            log.warning("state=%s does not exist: setting up a new state and saving it there", cfg["state"])
        extractor.setup(datasets[negatives_split(cfg["splits"])], batch_size=cfg["batch_size"])
    splits = {}
    for split, dataset in datasets.items():
        start = time.perf_counter()
        splits[split] = extractor.extract_blocks(dataset, batch_size=cfg["batch_size"])
        seconds = time.perf_counter() - start
        log.info("%s: %d items in %.1f s (%.2f items/s)", split, len(dataset), seconds, len(dataset) / seconds)
    state_path = Path(cfg["state"] or run_dir / "fungi_state.safetensors")
    if not loaded:  # a rerun into the same run folder replaces the state its features were not extracted with
        extractor.save(state_path, backbone)
    out = run_dir / "features.safetensors"
    save_features(out, splits, {"config": cfg, "extractor": extractor.describe()})
    log.info("features written to %s", out)
    return out


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error for bad input (``main`` returns results)."""
    run_cli(main, "fungi-extract")


if __name__ == "__main__":
    cli()
