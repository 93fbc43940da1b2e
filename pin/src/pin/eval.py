"""pin-eval: zero-shot localisation on PVOC07 / COCO / LVIS (<= 3 objects) and RefCOCO testA, for PIN and baselines.

    pin-eval [--config blip2|tiny|PATH] eval.checkpoint=RUN/checkpoints/step_X method=pin|vpt|lora|raw|random|kshot
             eval.datasets=[pvoc,coco,lvis,refcoco] eval.roots.coco=data/coco ...

Per object, the VLM continues "In the image is a {name} located at" (beam 3, 12 new tokens) and the first box is
parsed (the fallback box counts). Reports pooled per-object mIoU with M/L bins, mIoU_grid (against the ground truth
snapped to the codec's grid), the reference's batch-weighted figures, and P@0.3 for RefCOCO; writes metrics.json and
a box figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .boxes import GridCodec
from .checkpoint import load_weights, resolve_checkpoint
from .config import load_config, run_cli
from .eval_data import SYNTHETIC_SETS, QueryDataset, collate_queries, queries_for, synthetic_queries
from .figures import box_figure
from .methods import Method
from .metrics import batch_weighted_miou, localisation_miou, paired_iou, precision_at
from .pipeline import check_trained_with, codec_from_cfg, dataset_from_cfg, pools_from_cfg, predict_boxes, vlm_from_cfg
from .prompts import training_text
from .runlog import setup_logging
from .vlm import FrozenVLM

EVAL_METHODS = ("pin", "vpt", "lora", "raw", "random", "kshot")


def evaluate_queries(
    vlm: FrozenVLM | None,
    codec: GridCodec,
    queries,
    batch_size: int = 16,
    num_beams: int = 3,
    max_new_tokens: int = 12,
    context: str = "",
    random_seed: int | None = None,
) -> dict:
    """Predict a box per query (or random grid boxes when `random_seed` is given); returns preds, gts, batches."""
    loader = torch.utils.data.DataLoader(
        QueryDataset(queries, codec.image_size), batch_size=batch_size, collate_fn=collate_queries
    )
    rng = np.random.default_rng(random_seed) if random_seed is not None else None
    preds, gts, texts, batches = [], [], [], []
    for batch in tqdm(loader, desc="pin-eval", leave=False, disable=rng is not None):
        if rng is not None:
            boxes = [codec.cells_to_pixels(codec.random_cells(rng)) for _ in batch["name"]]
            out = [""] * len(boxes)
        else:
            boxes, out = predict_boxes(vlm, codec, batch["image"], batch["name"], num_beams, max_new_tokens, context)
        gt = batch["box"].tolist()
        preds += boxes
        gts += gt
        texts += out
        batches.append((boxes, gt))
    return {"preds": preds, "gts": gts, "texts": texts, "batches": batches}


def summarise(result: dict, codec: GridCodec, refcoco: bool = False) -> dict:
    """Pooled and batch-weighted mIoU and mIoU_grid (+ P@0.3 for RefCOCO) of an `evaluate_queries` result."""
    pooled = localisation_miou(result["preds"], result["gts"], codec.image_size, codec)
    weighted = batch_weighted_miou(result["batches"], codec.image_size, codec)
    out = {**pooled, **{f"batch_weighted_{k}": v for k, v in weighted.items()}}
    if refcoco:
        out["p@0.3"] = precision_at(result["preds"], result["gts"], 0.3)
    return out


def synthetic_eval_queries(cfg: dict, name: str = "synthetic") -> list:
    """Held-out compositions (`data.val_size` images on `data.val_backgrounds`) of the validation object pool
    (`synthetic`) or of the held-out classes' pool (`synthetic_zero_shot`, the reference's "zero_shot" split: classes
    never seen in training)."""
    _, val_pool, zero_shot_pool = pools_from_cfg(cfg)
    pool = val_pool if name == "synthetic" else zero_shot_pool
    if not len(pool):
        need = "data.val_size > 0" if name == "synthetic" else "held-out classes in the pool (data.held_out)"
        raise ValueError(f"eval dataset {name}: its object pool is empty; it needs {need}")
    return synthetic_queries(dataset_from_cfg(cfg, pool, "val"), cfg["data"].get("val_size", 100))


def kshot_context(cfg: dict, codec: GridCodec, k: int) -> str:
    """k synthetic example sentences prepended to the prompt (text-only in-context baseline)."""
    if k <= 0:
        return ""
    pool, _, _ = pools_from_cfg(cfg)
    ds = dataset_from_cfg(cfg, pool, "train", length=k)
    parts = []
    for i in range(k):
        comp = ds.composer.compose(i, 0, fixed=False)
        parts.append(training_text(comp.phrase, codec.encode(comp.boxes[comp.target]), ".", False))
    return " ".join(parts) + " "


def format_table(rows: list[dict]) -> str:
    """The paper's table shape: mIoU / mIoU_M / mIoU_L per dataset (then mIoU_grid, and P@0.3 for RefCOCO)."""

    def f(v):
        return "  -  " if v is None else f"{v:.3f}"

    lines = [
        "| method | dataset | objects | mIoU | mIoU_M | mIoU_L | mIoU_grid | batch-w. mIoU_M | batch-w. mIoU_L "
        "| P@0.3 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = f"{r['p@0.3']:.1f}" if "p@0.3" in r else "-"
        std = f" ± {r['miou_std']:.3f}" if "miou_std" in r else ""
        lines.append(
            f"| {r['method']} | {r['dataset']} | {r['num']} | {f(r['miou'])}{std} | {f(r['miou_m'])} | "
            f"{f(r['miou_l'])} | {f(r['miou_grid'])} | {f(r['batch_weighted_miou_m'])} | "
            f"{f(r['batch_weighted_miou_l'])} | {p} |"
        )
    return "\n".join(lines)


def run_eval(cfg: dict, vlm: FrozenVLM | None = None, method: Method | None = None, out_dir: Path | None = None):
    """Evaluate cfg["method"] on cfg["eval"]["datasets"]; returns (rows, table). Writes metrics.json + figures."""
    e, kind = cfg["eval"], cfg["method"]
    if kind not in EVAL_METHODS:
        raise ValueError(f"unknown method {kind!r}; expected one of {EVAL_METHODS}")
    k = e.get("kshot", 0)
    if kind == "kshot" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):  # 0 shots would be method=raw
        raise ValueError(f"eval.kshot={k!r}: method=kshot needs at least one in-context example (0 is method=raw)")
    out_dir = Path(out_dir or Path(cfg["out_dir"]) / cfg["name"] / "eval")
    log = setup_logging(out_dir)
    codec = codec_from_cfg(cfg)
    # every dataset's queries and the checkpoint are read before the VLM is built or anything is evaluated, so a
    # bad name, path or empty pool fails in seconds rather than after the first datasets
    if isinstance(e["datasets"], str):  # iterating it would read its letters as dataset names
        raise ValueError(f"eval.datasets={e['datasets']!r}: expected a list, e.g. eval.datasets=[{e['datasets']}]")
    repeated = sorted({n for n in e["datasets"] if list(e["datasets"]).count(n) > 1})
    if repeated:
        raise ValueError(f"eval.datasets lists {repeated} more than once: {list(e['datasets'])}")
    datasets = {}
    for name in e["datasets"]:
        if name in SYNTHETIC_SETS:
            datasets[name] = synthetic_eval_queries(cfg, name)
        else:
            datasets[name] = queries_for(name, e["roots"].get(name, f"data/{name}"), e["max_objects"], codec.image_size)
    if kind != "random" and vlm is None:
        weights = None
        if kind in ("pin", "vpt", "lora"):
            if not e.get("checkpoint"):
                raise ValueError(
                    f"method={kind} needs eval.checkpoint=<run>/checkpoints/step_X (or a .safetensors, or a reference "
                    ".pt such as PINs/PIN_OF.pt)"
                )
            checkpoint = resolve_checkpoint(e["checkpoint"])
            if checkpoint != Path(e["checkpoint"]):
                log.info(
                    "eval.checkpoint=%s is a run folder: evaluating its latest checkpoint %s",
                    e["checkpoint"],
                    checkpoint,
                )
            check_trained_with(cfg, checkpoint, f"eval.checkpoint={e['checkpoint']}", "evaluate")
            weights = load_weights(checkpoint)
        vlm = vlm_from_cfg(cfg)
        if torch.cuda.is_available():
            vlm.model.to("cuda")
        method = Method(vlm, "raw" if kind == "kshot" else kind, cfg)
        if weights is not None:
            method.load_state_dict(weights, source=checkpoint)
            method.to(next(vlm.model.parameters()).device)
    if method is not None:
        method.train(False)
    context = kshot_context(cfg, codec, k) if kind == "kshot" else ""
    rows, figure_sets = [], []
    for name, queries in datasets.items():
        if e.get("limit"):
            queries = queries[: e["limit"]]
        log.info("%s: %d object queries", name, len(queries))
        if kind == "random":
            runs = [
                evaluate_queries(None, codec, queries, e["batch_size"], random_seed=s)
                for s in range(e.get("random_seeds", 5))
            ]
            stats = [summarise(r, codec, name == "refcoco") for r in runs]
            row = dict(stats[0])
            for key in row:
                vals = [s[key] for s in stats]
                if all(isinstance(v, float) for v in vals):
                    row[key] = float(np.mean(vals))
            row["miou_std"] = float(np.std([s["miou"] for s in stats]))
            result = runs[0]
        else:
            result = evaluate_queries(
                vlm, codec, queries, e["batch_size"], e["num_beams"], e["max_new_tokens"], context
            )
            row = summarise(result, codec, name == "refcoco")
        rows.append({"method": kind, "dataset": name, **row})
        figure_sets.append((name, queries, result))
    table = format_table(rows)
    log.info("\n%s", table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(rows, indent=2))
    for name, queries, result in figure_sets:
        n = min(e.get("figure_images", 8), len(queries))
        if n == 0:
            continue
        ds = QueryDataset(queries[:n], codec.image_size)
        ious = paired_iou(result["preds"][:n], result["gts"][:n]).tolist()
        titles = [f"{q.name} (IoU {iou:.2f})" for q, iou in zip(queries[:n], ious)]
        box_figure(
            [ds[i]["image"] for i in range(n)],
            titles,
            result["preds"][:n],
            result["gts"][:n],
            out_dir / f"boxes_{name}_{kind}.png",
        )
    return rows, table


def main(argv: list[str] | None = None):
    """pin-eval: evaluate the configured `method` on `eval.datasets` (key=value overrides); returns the metric rows."""
    cfg, positional = load_config(argv)
    if positional:
        raise ValueError(f"pin-eval takes key=value overrides only, got {positional}")
    rows, _ = run_eval(cfg)
    return rows


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "pin-eval", ImportError)  # ImportError: an optional package


if __name__ == "__main__":
    cli()
