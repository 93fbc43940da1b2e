"""``dora-eval``: k-NN and linear probing on an ImageFolder (ImageNet by default) and DAVIS-2017 label propagation
for a DoRA, DINO or timm ViT checkpoint."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from dora.checkpoint import resolve_checkpoint
from dora.config import load_config, make_dir, run_cli
from dora.models import build_backbone, load_backbone

logger = logging.getLogger("dora")
DEFAULT_ARCH = "vit_small_patch16_224"  # arch: null without a checkpoint that records its own


def load_eval_backbone(cfg: dict) -> VisionTransformer:
    """The backbone named by ``arch`` with weights from ``checkpoint`` (see configs/eval.yaml)."""
    ckpt = cfg["checkpoint"]
    overrides = dict(cfg.get("model_overrides") or {})
    if isinstance(ckpt, str) and ckpt.startswith("timm:"):
        return build_backbone(ckpt[5:], pretrained=True, **overrides).eval()
    model = build_backbone(cfg["arch"], **overrides)
    if ckpt:
        missing, unexpected = load_backbone(model, ckpt, cfg["checkpoint_key"])
        if missing:
            raise ValueError(f"checkpoint {ckpt} lacks backbone weights {missing[:5]} (arch {cfg['arch']!r}?)")
        if unexpected:
            logger.warning("ignored %d unexpected keys, e.g. %s", len(unexpected), unexpected[:3])
    else:
        logger.warning("no checkpoint given: evaluating a randomly initialised %s", cfg["arch"])
    return model.eval()


@torch.no_grad()
def cls_features(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) final-norm CLS token (the k-NN feature)."""
    return model.forward_features(images)[:, 0]


@torch.no_grad()
def last_blocks_cls(model: VisionTransformer, images: torch.Tensor, n: int = 4) -> torch.Tensor:
    """(B, 3, H, W) -> (B, n*D): CLS tokens of the last n blocks, each through the final norm, concatenated."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o)) for b in model.blocks[-n:]]
    try:
        model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([model.norm(o)[:, 0] for o in outs], dim=-1)


@torch.no_grad()
def patch_features(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, D) final-norm patch tokens."""
    return model.forward_features(images)[:, model.num_prefix_tokens :]


def format_table(rows: list[tuple[str, str, float]]) -> str:
    """Rows (task, metric, value) as a fixed-width table."""
    lines = [f"{'task':<10} {'metric':<16} {'value':>8}", "-" * 36]
    lines += [f"{t:<10} {m:<16} {v:>8.2f}" for t, m, v in rows]
    return "\n".join(lines)


def resolve_checkpoint_model(cfg: dict) -> None:
    """Replace a run folder in ``cfg["checkpoint"]`` by its latest checkpoint (files and ``timm:`` stay), and fill
    ``arch`` / ``model_overrides`` left null with the ones a dora-train checkpoint recorded (``model.arch`` /
    ``model.overrides``), else ``vit_small_patch16_224`` without overrides."""
    recorded: dict = {}
    if cfg["checkpoint"] and not str(cfg["checkpoint"]).startswith("timm:"):
        resolved = resolve_checkpoint(cfg["checkpoint"])
        if resolved != Path(cfg["checkpoint"]):
            logger.info("checkpoint=%s is a run folder: using its latest checkpoint %s", cfg["checkpoint"], resolved)
            cfg["checkpoint"] = str(resolved)
        if (resolved / "state.json").is_file():
            recorded = (json.loads((resolved / "state.json").read_text()).get("config") or {}).get("model") or {}
    if cfg["arch"] is None:
        cfg["arch"] = recorded.get("arch", DEFAULT_ARCH)
    if cfg["model_overrides"] is None:
        cfg["model_overrides"] = dict(recorded.get("overrides") or {})
    if recorded:
        logger.info("backbone %s with overrides %s", cfg["arch"], cfg["model_overrides"])


def main(argv: list[str] | None = None) -> dict:
    """Run the configured evaluations; prints a table and writes ``metrics.json``."""
    from dora.davis import evaluate_davis
    from dora.train import setup_logging
    from funai_common.datasets import ImageFolderDataset
    from funai_common.features import extract_features
    from funai_common.knn import knn_classify_many
    from funai_common.linear import linear_probe
    from funai_common.transforms import eval_transform

    cfg = load_config(argv if argv is not None else sys.argv[1:], default="eval.yaml")
    out_dir = make_dir(cfg["out_dir"] or Path("runs") / "dora" / "eval" / cfg["name"], "out_dir")
    setup_logging(out_dir, True)
    unknown = set(cfg["tasks"]) - {"knn", "linear", "davis"}
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected knn, linear, davis")
    max_videos = cfg["davis"]["max_videos"]  # -1 had dropped the last video, a word had crashed
    if max_videos is not None and (isinstance(max_videos, bool) or not isinstance(max_videos, int) or max_videos < 1):
        raise ValueError(f"davis.max_videos={max_videos!r}: expected a positive integer, or null (all videos)")
    device = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device={cfg['device']!r}: expected auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg['device']!r} but torch sees no CUDA device; use device=auto or device=cpu")
    resolve_checkpoint_model(cfg)  # metrics.json names the checkpoint and backbone evaluated
    model = load_eval_backbone(cfg).to(device)
    metrics: dict = {
        "checkpoint": str(cfg["checkpoint"]),
        "arch": cfg["arch"],
        "model_overrides": cfg["model_overrides"],
    }
    rows: list[tuple[str, str, float]] = []
    if {"knn", "linear"} & set(cfg["tasks"]):
        im = cfg["imagenet"]
        tf = eval_transform(im["resize"], im["crop"])
        train_ds, val_ds = ImageFolderDataset(im["train"], tf), ImageFolderDataset(im["val"], tf)
        if list(train_ds.classes) != list(val_ds.classes):
            only = sorted(set(train_ds.classes) ^ set(val_ds.classes))[:5]
            raise ValueError(
                f"class folders of {im['train']} ({len(train_ds.classes)}) and {im['val']} ({len(val_ds.classes)}) "
                f"differ (e.g. {only}): labels would not match"
            )
        num_classes = len(train_ds.classes)
        n_last = cfg["linear"]["n_last_blocks"]
        need_linear = "linear" in cfg["tasks"]

        def feature_fn(x: torch.Tensor) -> torch.Tensor:
            return last_blocks_cls(model, x, n_last) if need_linear else cls_features(model, x)

        kw = {"batch_size": cfg["batch_size"], "device": device, "num_workers": cfg["num_workers"]}
        train_f, train_y = extract_features(feature_fn, train_ds, **kw)
        val_f, val_y = extract_features(feature_fn, val_ds, **kw)
        if "knn" in cfg["tasks"]:
            d = model.embed_dim
            # the last block's CLS through the final norm is the k-NN feature (last slice when n_last blocks are kept)
            tr, va = (train_f[:, -d:], val_f[:, -d:])
            res = knn_classify_many(
                tr,
                train_y,
                va,
                val_y,
                ks=tuple(cfg["knn"]["ks"]),
                temperature=cfg["knn"]["temperature"],
                num_classes=num_classes,
                backend=cfg["knn"]["backend"],
            )
            metrics["knn"] = {str(k): v for k, v in res.items()}
            rows += [("k-NN", f"top-1 (k={k})", v["top1"]) for k, v in res.items()]
        if need_linear:
            res = linear_probe(train_f, train_y, val_f, val_y, C=cfg["linear"]["C"], max_iter=cfg["linear"]["max_iter"])
            metrics["linear"] = res
            rows += [("linear", "top-1", res["top1"]), ("linear", "top-5", res["top5"])]
    if "davis" in cfg["tasks"]:
        dv = cfg["davis"]
        res = evaluate_davis(
            lambda x: patch_features(model, x),
            dv["root"],
            model.patch_embed.patch_size[0],
            dv["split"],
            dv["resolution"],
            dv["short_side"],
            dv["n_last_frames"],
            dv["topk"],
            dv["neighbourhood"],
            dv["temperature"],
            dv["max_videos"],
            device,
        )
        metrics["davis"] = res
        rows += [("DAVIS-17", k, res[k]) for k in ("J&F-Mean", "J-Mean", "F-Mean")]
    table = format_table(rows)
    print(table)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    logger.info("metrics written to %s", out_dir / "metrics.json")
    return metrics


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "dora-eval")


if __name__ == "__main__":
    cli()
