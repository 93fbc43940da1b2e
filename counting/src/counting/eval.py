"""counting-eval: FSC-147 / CARPK / MSO counting with the reference protocol; paper-shaped table + metrics.json."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from counting.checkpoint import load_model_weights, resolve_checkpoint
from counting.config import load_config, load_yaml, make_dir, run_cli
from counting.data import build_test_set
from counting.figures import save_density_figure
from counting.inference import count_image
from counting.metrics import SUBSETS, count_metrics, kendall_tau
from counting.models import UnCounTR, build_model
from counting.preprocess import device_of
from counting.reference import REFERENCE_SUFFIXES, load_reference_model
from counting.train import setup_logging

log = logging.getLogger("counting")


def load_trained_model(
    checkpoint: str | Path, model_config: str | Path | None = None, reference_args: str | Path | None = None
) -> tuple[UnCounTR, dict]:
    """Model + training config from a checkpoint directory (``state.json`` + ``model.safetensors``), or from the
    official release's ``UnCounTRModel.pt`` (``.pt``/``.pth``: ``counting.reference``, with its ``args.pt``)."""
    checkpoint = Path(checkpoint)
    if checkpoint.suffix in REFERENCE_SUFFIXES:
        return load_reference_model(checkpoint, reference_args, model_config)
    if model_config is not None:
        cfg = load_yaml(model_config)
        missing = [key for key in ("model", "collage") if not isinstance(cfg.get(key), dict)]
        if missing:
            raise KeyError(f"model config {model_config} lacks the sections {missing}: expected the run's config.yaml")
    else:
        state = checkpoint / "state.json"
        if not state.is_file():
            raise FileNotFoundError(
                f"{state} not found: give a checkpoint directory (<run>/checkpoints/step_XXXXXX) or a model config "
                "(counting-eval model_config=PATH, counting-predict --model-config PATH)"
            )
        cfg = json.loads(state.read_text())["config"]
    model = build_model(cfg["model"])
    load_model_weights(model, checkpoint)
    return model.eval(), cfg


def density_fn_for(model: UnCounTR, exemplars: torch.Tensor):
    """Window (1, 3, w, w) -> density (1, w, w), with the exemplars' tokens computed once per image."""
    tokens = model.exemplar_tokens(exemplars[None])
    patch = model.patch_size

    def fn(window: torch.Tensor) -> torch.Tensor:
        if window.shape[-2] % patch or window.shape[-1] % patch:
            raise ValueError(
                f"window {window.shape[-2]}x{window.shape[-1]} px is not a multiple of the model's patch size {patch} "
                "(counting-eval window= / target_height=, counting-predict --height)"
            )
        grid = (window.shape[-2] // patch, window.shape[-1] // patch)
        return model.forward_head(model.backbone(window), tokens, grid)

    return fn


@torch.no_grad()
def evaluate_split(
    model: UnCounTR, dataset, ecfg: dict, device: torch.device, fig_dir: Path | None, density_scaling: float
):
    """Counts of every image of ``dataset``; returns (records, metrics)."""
    n = len(dataset) if ecfg["max_images"] is None else min(len(dataset), int(ecfg["max_images"]))
    figures = [ecfg["figures"]] if isinstance(ecfg["figures"], str) else ecfg["figures"]  # figures=NAME: one image
    records = []
    for i in tqdm(range(n), desc="eval", leave=False):
        item = dataset[i]
        exemplars = item["exemplars"][: ecfg["shots"]].to(device)
        rects = item["rects"][: ecfg["shots"]]
        count, density = count_image(
            density_fn_for(model, exemplars),
            item["image"][None].to(device),
            rects,
            protocol=ecfg["protocol"],
            window=ecfg["window"],
            stride=ecfg["stride"],
            tile_min_side=ecfg["tile_min_side"],
            norm_threshold=ecfg["norm_threshold"],
            density_scaling=density_scaling,
        )
        records.append({"name": item["name"], "pred": count, "gt": item["count"]})
        draw = i < figures if isinstance(figures, int) else item["name"] in figures
        if fig_dir is not None and draw:
            h, w = item["image"].shape[-2:]
            boxes = item["rel_boxes"][: ecfg["shots"]] * torch.tensor([w, h, w, h])
            save_density_figure(
                fig_dir / f"{Path(item['name']).stem}.png",
                item["image"],
                density.cpu(),
                count,
                item["count"],
                boxes,
                gt_density=item["gt_density"],
                gt_points=item["points"],
            )
    metrics = count_metrics([r["pred"] for r in records], [r["gt"] for r in records])
    metrics["kendall_tau"] = kendall_tau([r["pred"] for r in records], [r["gt"] for r in records])
    metrics["num_images"] = len(records)
    return records, metrics


def eval_splits(dataset: str, splits: list[str] | None) -> list[str]:
    """Splits to evaluate: ``splits`` if given, else the dataset's own (FSC-147 val and test; CARPK and MSO test)."""
    name = dataset.lower().replace("-", "")
    if splits is None:
        return ["val", "test"] if name == "fsc147" else ["test"]
    if isinstance(splits, str):  # splits=test: one split, not its letters
        splits = [splits]
    if name == "mso" and list(splits) != ["test"]:
        raise ValueError(f"MSO has a single split, test; got splits={list(splits)} (leave splits unset)")
    return list(splits)


def format_table(results: dict[str, dict]) -> str:
    """Markdown table shaped like the paper's: MAE / RMSE per split, then the test subsets."""
    lines = ["| split | MAE | RMSE | images |", "| --- | --- | --- | --- |"]
    for split, m in results.items():
        lines.append(f"| {split} | {m['mae']:.2f} | {m['rmse']:.2f} | {m['num_images']} |")
    for split, m in results.items():
        for subset in SUBSETS:
            lines.append(f"| {split} {subset} | {m[subset]['mae']:.2f} | {m[subset]['rmse']:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Evaluate a checkpoint; returns {split: metrics}."""
    ecfg, rest = load_config(sys.argv[1:] if argv is None else argv, default="eval")
    if rest:
        raise ValueError(f"unexpected arguments {rest}; use key=value overrides (checkpoint=PATH ...)")
    if not ecfg["checkpoint"]:
        raise ValueError("checkpoint=PATH is required (a <run>/checkpoints/step_XXXXXX directory or UnCounTRModel.pt)")
    checkpoint = resolve_checkpoint(ecfg["checkpoint"])
    if type(ecfg["shots"]) is not int or ecfg["shots"] < 1:
        raise ValueError(f"shots={ecfg['shots']!r}: expected the number of exemplars per image, 1 to 3")
    if ecfg["max_images"] is not None and (type(ecfg["max_images"]) is not int or ecfg["max_images"] < 1):
        raise ValueError(f"max_images={ecfg['max_images']!r}: expected a positive integer, or null (every image)")
    splits = eval_splits(ecfg["dataset"], ecfg["splits"])
    run_dir = checkpoint.parent if checkpoint.suffix in REFERENCE_SUFFIXES else checkpoint.parent.parent
    out = Path(ecfg["out"]) if ecfg["out"] else run_dir / f"eval_{ecfg['dataset']}"
    device = device_of(ecfg)
    # loaded before ``out`` exists: a typo leaves nothing behind
    model, cfg = load_trained_model(checkpoint, ecfg["model_config"], ecfg["reference_args"])
    setup_logging(make_dir(out, "out"))
    if checkpoint != Path(ecfg["checkpoint"]):
        log.info("checkpoint=%s is a run folder: evaluating its latest checkpoint %s", ecfg["checkpoint"], checkpoint)
    model.to(device)
    scaling = cfg["collage"]["density_scaling"]
    results, predictions = {}, {}
    for split in splits:
        kwargs = {"patch_size": model.patch_size, "target_height": ecfg["target_height"]}
        if ecfg["dataset"].lower() != "mso":
            kwargs["shots"] = ecfg["shots"]
        if ecfg["protocol"] == "fixed_images":
            kwargs["fixed"] = True
        dataset = build_test_set(ecfg["dataset"], ecfg["root"], split, **kwargs)
        if not len(dataset):
            raise ValueError(f"{ecfg['dataset']} split {split!r} under {ecfg['root']} has no image to evaluate")
        records, metrics = evaluate_split(model, dataset, ecfg, device, out / "figures" / split, scaling)
        results[split], predictions[split] = metrics, records
    table = format_table(results)
    log.info("%s (%s protocol)\n%s", ecfg["dataset"], ecfg["protocol"], table)
    # an empty count subset (NaN in memory) is written as null: NaN is not standard JSON
    for name, payload in (("metrics", {"config": ecfg, "results": results}), ("predictions", predictions)):
        payload = json.loads(json.dumps(payload), parse_constant=lambda _: None)
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2, allow_nan=False))
    return results


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "counting-eval", ImportError)


if __name__ == "__main__":
    cli()
