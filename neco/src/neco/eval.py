"""``neco-eval``: Hummingbird (dense NN retrieval), linear segmentation and overclustering of a backbone.

    neco-eval checkpoint=runs/neco/neco_dinov2r_vits14                # latest checkpoint of a run (student)
    neco-eval model.name=vit_small_patch14_reg4_dinov2.lvd142m         # any timm model (baseline row)
    neco-eval --config eval_tiny checkpoint=runs/neco/neco_tiny        # CPU, synthetic data

Prints a table shaped like the paper's README table (Pascal VOC, mIoU %) and writes ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import torch
from torch.utils.data import Subset

from funai_common.weights import load_safetensors
from neco.checkpoint import list_checkpoints
from neco.config import load_config, run_cli
from neco.evaluation import linear_segmentation, overclustering
from neco.models import build_backbone, patch_tokens
from neco.train import setup_logging

log = logging.getLogger("neco")

# vpariza/NeCo README, Pascal VOC 2012 mIoU (%): overcluster K=500, dense NN retrieval, linear.
PAPER_TABLE = {
    "neco_dinov2_vits14": (57.7, 78.6, 81.4),
    "neco_dinov2r_xr_vits14": (72.6, 80.2, 81.3),
    "neco_dinov2r_vits14": (68.9, 80.7, 81.5),
    "neco_dinov2_vitb14": (71.1, 82.8, 84.5),
    "neco_dinov2r_xr_vitb14": (71.8, 83.5, 83.3),
    "neco_dinov2r_vitb14": (71.9, 82.9, 84.4),
    "neco_dino_vits16": (47.9, 61.3, 65.8),
    "neco_timetuning_vits16": (53.1, 66.5, 68.5),
    "neco_leopart_vits16": (55.3, 66.2, 68.3),
}


EVALS = ("hummingbird", "linear", "overcluster")


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"checkpoint={path!r}: neither a checkpoint (no meta.json) nor a run with checkpoints")
    return found[-1]


def backbone_from_checkpoint(path: str, weights: str = "student") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the trained backbone of a NeCo checkpoint (``weights``: student or teacher) and its train config."""
    path = resolve_checkpoint(path)
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    with open(os.path.join(path, "meta.json")) as f:
        train_cfg = json.load(f)["config"]
    if weights == "teacher" and not train_cfg.get("loss", {}).get("use_teacher", True):
        raise ValueError(
            f"{path} was trained without a teacher (loss.use_teacher=false): its teacher.safetensors holds the "
            "starting weights, not a trained model; use weights=student"
        )
    model_cfg = dict(train_cfg["model"], pretrained=False, checkpoint=None, drop_path=0.0)
    backbone = build_backbone(model_cfg)
    state = load_safetensors(os.path.join(path, f"{weights}.safetensors"))
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")})
    return backbone, train_cfg


def feature_function(backbone: torch.nn.Module):
    """images (B, 3, H, W) -> final-norm patch tokens (B, S*S, D), no gradients."""

    @torch.no_grad()
    def fn(images: torch.Tensor) -> torch.Tensor:
        return patch_tokens(backbone, images)

    return fn


def _datasets(cfg: dict[str, Any]):
    from funai_common.datasets import build_segmentation_dataset

    d = cfg["data"]
    extra = {}
    if d["dataset"] == "synthetic":
        extra = {"num_images": d["synthetic_images"], "image_size": d["synthetic_size"]}
        if d["num_classes"]:  # null (eval_voc's default): the synthetic dataset's own number of classes
            extra["num_classes"] = int(d["num_classes"])
    # VOC trains on the SBD-augmented "trainaug" list; ADE20K, COCO and Cityscapes have no such split
    train_split = d["train_split"] or ("trainaug" if d["dataset"] == "voc" else "train")
    train = build_segmentation_dataset(d["dataset"], d["root"], train_split, **extra)
    val = build_segmentation_dataset(d["dataset"], d["root"], d["val_split"], **extra)
    if d["dataset"] != "synthetic" and d["num_classes"] and int(d["num_classes"]) != val.num_classes:
        raise ValueError(
            f"data.num_classes={d['num_classes']} but {d['dataset']} has {val.num_classes} classes: "
            "set data.num_classes=null (the dataset's)"
        )
    return train, val, int(d["num_classes"] or val.num_classes), getattr(val, "ignore_index", 255)


# the reference's linear_finetune.py trains the COCO heads on a random 10 % of train2017, the others on all images
LINEAR_TRAIN_FRACTION = {"coco-things": 0.1, "coco-stuff": 0.1}


def train_subset(dataset: Any, fraction: float, seed: int = 0, key: str = "hummingbird.train_fraction") -> Any:
    """A seeded random ``fraction`` of a dataset (Hummingbird's 1/128 ... 1/1 memory-set sizes, the linear head's
    10 % of COCO); ``key`` names the setting in the error for a fraction outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"{key} must be in (0, 1], got {fraction}")
    if fraction == 1:
        return dataset
    count = max(1, round(len(dataset) * fraction))
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return Subset(dataset, keep.tolist())


def hummingbird_memory_images(dataset: Any, h: dict[str, Any]) -> Any:
    """The memory images: the reference's file set (``train_file_set``: one image id per line, as
    open-hummingbird-eval's ``file_sets/``) if given, else a seeded random ``train_fraction``."""
    if h.get("train_file_set"):
        from funai_common.datasets import subset

        if h["train_fraction"] != 1:
            raise ValueError(
                f"hummingbird.train_file_set={h['train_file_set']!r} and hummingbird.train_fraction="
                f"{h['train_fraction']!r}: set one of them, not both (the file set fixes the memory images)"
            )
        return subset(dataset, h["train_file_set"])
    return train_subset(dataset, h["train_fraction"])


def linear_train_images(dataset: Any, cfg: dict[str, Any]) -> Any:
    """The linear head's training images: ``linear.train_fraction`` of them (null: the reference's choice for the
    dataset, 10 % for COCO-Things / COCO-Stuff, all for the others), a seeded random subset."""
    fraction = cfg["linear"].get("train_fraction")  # configs written before this key: the per-dataset default
    if fraction is None:
        fraction = LINEAR_TRAIN_FRACTION.get(cfg["data"]["dataset"], 1.0)
    return train_subset(dataset, float(fraction), key="linear.train_fraction")


def format_table(name: str, results: dict[str, float], paper: tuple[float, float, float] | None) -> str:
    """Markdown table shaped like the paper's (VOC mIoU %): overclustering at the largest K, NN retrieval, linear."""
    ks = sorted(int(k[len("overcluster_k") :]) for k in results if k.startswith("overcluster_k"))
    k = ks[-1] if ks else 500
    keys = [f"overcluster_k{k}", "hummingbird", "linear"]
    cols = [f"Overcluster K={k}", "Dense NN retrieval", "Linear"]
    lines = [f"| model | {' | '.join(cols)} |", "|---|" + "---|" * len(cols)]
    measured = " | ".join(f"{results[key]:.1f}" if key in results else "-" for key in keys)
    lines.append(f"| {name} (measured) | {measured} |")
    if paper:
        lines.append(f"| {name} (paper) | " + " | ".join(f"{v:.1f}" for v in paper) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate; returns the metrics dict also written to ``<output>/metrics.json``."""
    cfg = load_config(sys.argv[1:] if argv is None else argv, default="eval_voc")
    unknown = [e for e in cfg["evals"] if e not in EVALS]
    if unknown or not cfg["evals"]:
        raise ValueError(f"evals={cfg['evals']!r}: expected a non-empty list of {list(EVALS)}")
    device = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"device={cfg['device']!r}: expected auto, cpu or cuda[:N] (cuda needs a visible GPU)")
    if cfg["output"] and os.path.exists(cfg["output"]) and not os.path.isdir(cfg["output"]):
        raise ValueError(
            f"output={cfg['output']!r} is a file; expected a directory (metrics.json and log.txt go in it)"
        )
    train_ds, val_ds, num_classes, ignore = _datasets(cfg)  # fail on missing data before loading weights
    memory_ds = hummingbird_memory_images(train_ds, cfg["hummingbird"]) if "hummingbird" in cfg["evals"] else None
    linear_ds = linear_train_images(train_ds, cfg) if "linear" in cfg["evals"] else None
    if cfg["checkpoint"]:
        backbone, train_cfg = backbone_from_checkpoint(cfg["checkpoint"], cfg["weights"])
        name, patch = train_cfg["name"], train_cfg["model"]["patch_size"]
    else:
        backbone = build_backbone(dict(cfg["model"], drop_path=0.0))
        name, patch = cfg["model"]["name"], cfg["model"]["patch_size"]
    backbone.eval().to(device)
    out_dir = cfg["output"] or os.path.join("runs", "neco-eval", name.replace("/", "_"))
    os.makedirs(out_dir, exist_ok=True)
    setup_logging(out_dir, True)
    fn = feature_function(backbone)
    progress = bool(cfg["progress"])
    metrics: dict[str, Any] = {"model": name, "dataset": cfg["data"]["dataset"], "num_classes": num_classes}
    summary: dict[str, float] = {}
    if "hummingbird" in cfg["evals"]:
        from funai_common.hummingbird import HummingbirdEvaluator

        h = cfg["hummingbird"]
        res = HummingbirdEvaluator(
            fn,
            memory_ds,
            val_ds,
            num_classes,
            patch,
            input_size=h["input_size"],
            memory_size=h["memory_size"],
            augmentation_epochs=h["augmentation_epochs"],
            num_neighbors=h["num_neighbors"],
            temperature=h["temperature"],
            batch_size=h["batch_size"],
            ignore_index=ignore,
            device=device,
            progress=progress,
        ).evaluate()
        # which memory images: a file set and a fraction give different numbers under the same model name
        res.update(
            memory_images=len(memory_ds), train_file_set=h.get("train_file_set"), train_fraction=h["train_fraction"]
        )
        metrics["hummingbird"] = res
        summary["hummingbird"] = 100 * res["miou"]
    if "linear" in cfg["evals"]:
        lc = cfg["linear"]
        res = linear_segmentation(
            fn,
            linear_ds,
            val_ds,
            num_classes,
            patch,
            input_size=lc["input_size"],
            mask_size=lc["mask_size"],
            epochs=lc["epochs"],
            lr=lc["lr"],
            momentum=lc["momentum"],
            weight_decay=lc["weight_decay"],
            milestones=lc["milestones"],
            batch_size=lc["batch_size"],
            ignore_index=ignore,
            device=device,
            progress=progress,
        )
        metrics["linear"] = dict(res, train_images=len(linear_ds))
        summary["linear"] = 100 * res["miou"]
    if "overcluster" in cfg["evals"]:
        oc = cfg["overcluster"]
        ks = [num_classes if k == "num_classes" else int(k) for k in oc["ks"]]
        res = overclustering(
            fn,
            val_ds,
            num_classes,
            patch,
            ks=ks,
            input_size=oc["input_size"],
            mask_size=oc["mask_size"],
            pca_dim=oc["pca_dim"],
            seeds=list(range(oc["seeds"])),
            niter=oc["niter"],
            nredo=oc["nredo"],
            ignore_index=ignore,
            device=device,
            progress=progress,
        )
        metrics["overcluster"] = res
        for key, value in res.items():
            summary[f"overcluster_k{key[2:]}"] = 100 * value["miou"]
    metrics["summary_percent"] = summary
    table = format_table(name, summary, PAPER_TABLE.get(name) if cfg["data"]["dataset"] == "voc" else None)
    print(table)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    log.info("wrote %s", os.path.join(out_dir, "metrics.json"))
    return metrics


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "neco-eval")


if __name__ == "__main__":
    cli()
