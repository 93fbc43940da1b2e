"""`sharelock-eval`: zero-shot classification (top-1/top-5) with the reference template or a template ensemble."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sharelock.config import load_config, read_json, run_cli
from sharelock.data import LabelledImages, is_hf_spec, load_class_names, parse_hf_spec
from sharelock.models import ShareLock, load_model, resolve_checkpoint
from sharelock.store import FeatureStore
from sharelock.templates import resolve_templates

log = logging.getLogger("sharelock")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent from logits (N, C) and labels (N,); k is capped at C."""
    labels = torch.as_tensor(labels).to(logits.device)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, : min(k, kmax)].any(1).float().mean().item() for k in ks}


def classifier_from_store(model: ShareLock, store: FeatureStore) -> torch.Tensor:
    """Class prototypes (C, D) from a class-prompt store: ids `c` (one template) or `t/c` (ensemble, averaged)."""
    if all("/" not in i for i in store.ids):
        return model.zero_shot_classifier(store.get([str(c) for c in range(len(store))]))
    pairs = [tuple(int(x) for x in i.split("/")) for i in store.ids]
    n_t, n_c = max(p[0] for p in pairs) + 1, max(p[1] for p in pairs) + 1
    total = sum(model.encode_text(store.get([f"{t}/{c}" for c in range(n_c)])) for t in range(n_t))
    return model.ensemble(total / n_t)


@torch.no_grad()
def evaluate_features(
    model: ShareLock, features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Top-1/top-5 (%) of the logits `encode_image(features) @ classifier.T` (cosines with the default normalised
    heads) between image features (N, vision_dim) and prototypes (C, D)."""
    device = classifier.device
    logits = torch.cat(
        [
            model.encode_image(features[i : i + batch_size].to(device)) @ classifier.t()
            for i in range(0, len(features), batch_size)
        ]
    )
    return topk_accuracy(logits, labels)


def evaluate_stores(model: ShareLock, features: str | Path, class_features: str | Path) -> dict[str, float]:
    """Zero-shot accuracy from a labelled image store and a class-prompt store."""
    images = FeatureStore(features, modality="image")
    if images.labels is None:
        raise ValueError(f"feature store {features} has no labels (extract it with source.type=labelled)")
    classifier = classifier_from_store(model, FeatureStore(class_features, modality="text"))
    return evaluate_features(model, images.load_all(), torch.from_numpy(images.labels), classifier)


def _image_features(model: ShareLock, dataset: LabelledImages, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], num_workers=cfg["num_workers"])
    encoder = model._encoders.get("vision")
    if encoder is None:
        raise ValueError("images= needs the vision backbone recorded in the checkpoint; use features= instead")
    device = next(encoder.parameters()).device
    feats, labels = [], []
    with torch.no_grad():
        for _, images, label in tqdm(loader, desc="image features"):
            feats.append(encoder(images.to(device)).float().cpu())
            labels.append(label)
    return torch.cat(feats), torch.cat(labels)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of `sharelock-eval`; prints a table and writes metrics.json."""
    from sharelock.train import setup_logging

    cfg = load_config(sys.argv[1:] if argv is None else argv, "eval")
    if not cfg["checkpoint"]:
        raise ValueError("set checkpoint=RUN_DIR or a checkpoint directory")
    ckpt = resolve_checkpoint(cfg["checkpoint"])
    source = cfg["features"] or cfg["images"]
    if not source:
        raise ValueError("set features=STORE (labelled image features) or images=DATASET_ROOT|hf:<name>[:<split>]")
    meta = read_json(ckpt / "meta.json")
    backbones = dict(meta.get("backbones") or {})
    store = None
    if cfg["features"]:
        store = FeatureStore(cfg["features"], model=backbones.get("vision_model"), modality="image")
        if store.labels is None:
            raise ValueError(f"feature store {store.path} has no labels (extract it with source.type=labelled)")
    store_source = store.meta.get("source", {}) if store is not None else {}
    # an hf: dataset (given directly, or the source of the store) names its classes itself, as in the reference
    from_hf = is_hf_spec(store_source.get("path") if store is not None else cfg["images"])
    if not (cfg["class_features"] or cfg["class_names"] or from_hf):
        raise ValueError("set class_names=FILE or class_features=STORE (an hf: dataset gives its own class names)")
    # the images, class names and templates are checked before any model is loaded or any image encoded
    dataset = None
    if store is None:
        dataset = LabelledImages(
            cfg["images"], cfg["kind"], cfg["split"], image_column=cfg["image_column"], label_column=cfg["label_column"]
        )
        folder_classes = dataset.classes
    else:
        folder_classes = store_source.get("classes")
    if not (cfg["class_features"] or cfg["class_names"] or folder_classes):
        raise ValueError(f"{source} has no class names (its label column is not a ClassLabel): set class_names=FILE")
    templates = resolve_templates(cfg["templates"])
    names = text_spec = None
    if not cfg["class_features"]:
        names = load_class_names(cfg["class_names"] or folder_classes, folder_classes, cfg["label_column"])
        from sharelock.features import language_spec

        text_spec = language_spec(backbones, cfg["language_model"])
    if store is None and is_hf_spec(source):
        hf_name, hf_split = parse_hf_spec(source)
        name = cfg["name"] or f"{Path(hf_name).name}-{hf_split or cfg['split']}"
    else:
        name = cfg["name"] or Path(source).name
    out = Path(cfg["out"] or ckpt.parent.parent / "eval" / name)
    setup_logging(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(ckpt, device)
    if cfg["images"] and backbones.get("vision"):
        from sharelock.features import build_vision_encoder

        model.attach_encoders(vision_encoder=build_vision_encoder(backbones["vision"]).to(device))
    if store is not None:
        features, labels = store.load_all(), torch.from_numpy(store.labels)
    else:
        features, labels = _image_features(model, dataset, cfg)
    if cfg["class_features"]:
        prompts = FeatureStore(cfg["class_features"], model=backbones.get("text_model"), modality="text")
        classifier = classifier_from_store(model, prompts)
        templates_used = "precomputed"
    else:
        from sharelock.features import build_language_encoder, with_default_dtype

        language, tokenizer = build_language_encoder(with_default_dtype(text_spec, device), device)
        model.attach_encoders(model._encoders.get("vision"), None, language, tokenizer, cfg["text_batch_size"])
        classifier = model.zero_shot_classifier(names, templates)
        templates_used = f"{len(templates)} template(s)"
    if classifier.shape[0] <= int(labels.max()):
        raise ValueError(f"{classifier.shape[0]} classes but labels go up to {int(labels.max())}")
    if folder_classes and classifier.shape[0] != len(folder_classes):
        raise ValueError(f"{classifier.shape[0]} class prototypes for {len(folder_classes)} class folders of {source}")
    metrics = evaluate_features(model, features, labels, classifier.to(device))
    result = {"dataset": name, "checkpoint": str(ckpt), "templates": templates_used, "n": len(labels), **metrics}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    table = "| dataset | n | top-1 | top-5 |\n|---|---|---|---|\n"
    table += f"| {name} | {len(labels)} | {metrics['top1']:.2f} | {metrics['top5']:.2f} |"
    log.info("zero-shot classification\n%s", table)
    return result


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "sharelock-eval", ImportError)


if __name__ == "__main__":
    cli()
