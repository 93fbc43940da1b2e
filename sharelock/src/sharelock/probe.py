"""`sharelock-probe`: class-disjoint probing of how much visual knowledge a language model's embeddings hold.

Images of the *training* classes are paired with the caption `template.format(class)`; the heads are trained with the
ShareLock recipe; zero-shot accuracy is then measured on images of *disjoint test* classes against their prompts only.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from sharelock.config import load_config, read_json, run_cli
from sharelock.data import is_hf_spec, load_class_names
from sharelock.eval import evaluate_features
from sharelock.models import format_prompt, load_model
from sharelock.pairs import TensorPairs
from sharelock.store import FeatureStore
from sharelock.train import check_fresh_run, fit, setup_logging

log = logging.getLogger("sharelock")


def class_split(names: list[str], splits: Any, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train class ids, test class ids): from a {"train": [...], "test": [...]} dict/JSON file of names or ids, or
    a seeded random split. The two sets must be disjoint."""
    if splits is None:
        order = np.random.default_rng(seed).permutation(len(names)).tolist()
        n_test = max(1, int(round(test_fraction * len(names))))
        if n_test >= len(names):
            raise ValueError(f"probe.test_fraction={test_fraction} leaves no training class of the {len(names)}")
        return sorted(order[n_test:]), sorted(order[:n_test])
    where = "probe.splits"
    if isinstance(splits, str | Path):
        path = Path(splits)
        if not path.is_file():
            raise FileNotFoundError(f"class splits file not found: {path} (expected JSON with 'train' and 'test')")
        splits, where = read_json(path), str(path)
    if not isinstance(splits, dict) or not {"train", "test"} <= set(splits):
        found = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
        raise KeyError(f"class splits {where}: expected a mapping with the keys 'train' and 'test', got {found}")
    index = {n: i for i, n in enumerate(names)}

    def ids(items: list) -> list[int]:
        out = []
        for item in items:
            if isinstance(item, int):
                if not 0 <= item < len(names):
                    raise ValueError(
                        f"class id {item} of {where} is not among the {len(names)} class ids 0..{len(names) - 1}"
                    )
                out.append(item)
            elif item in index:
                out.append(index[item])
            else:
                raise KeyError(f"class {item!r} of {where} is not among the {len(names)} class names")
        return sorted(set(out))

    train, test = ids(splits["train"]), ids(splits["test"])
    if not train or not test:
        raise ValueError(f"class splits {where}: {'train' if not train else 'test'} lists no class")
    overlap = set(train) & set(test)
    if overlap:
        raise ValueError(f"class-disjoint protocol: classes in both splits: {sorted(names[i] for i in overlap)}")
    return train, test


def class_text_features(cfg: dict, names: list[str], device: torch.device) -> torch.Tensor:
    """(C, text_dim) features of the class prompts, from a store or by running the language model."""
    probe = cfg["probe"]
    if probe["class_features"]:
        store = FeatureStore(probe["class_features"], modality="text")
        return store.get([str(i) for i in range(len(names))])
    from sharelock.features import build_language_encoder, last_token_features, with_default_dtype

    model, tokenizer = build_language_encoder(with_default_dtype(cfg["language"], device), device)
    prompts = [format_prompt(probe["template"], n) for n in names]
    return last_token_features(model, tokenizer, prompts, cfg["text_batch_size"], cfg["language"]["max_length"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of `sharelock-probe`; prints the table and writes metrics.json in the run directory."""
    cfg = load_config(sys.argv[1:] if argv is None else argv, "probe")
    probe = cfg["probe"]
    if not probe["features"]:
        raise ValueError(
            "set probe.features=STORE (labelled image features) and, unless the store was extracted from an hf: "
            "dataset, probe.class_names=FILE"
        )
    cuda = torch.cuda.is_available()  # CPU processes (gloo) must form one job, not several rank-0 runs
    accelerator = Accelerator(cpu=not cuda, mixed_precision=cfg["mixed_precision"] if cuda else "no")
    run_dir = Path(cfg["run_dir"] or Path("runs") / "sharelock" / cfg["name"])
    check_fresh_run(run_dir, cfg.get("resume"))
    setup_logging(run_dir, accelerator.is_main_process)  # fit writes config.yaml once the resume checks pass
    if not cuda and cfg["mixed_precision"] != "no":
        log.warning("mixed_precision=%s needs a GPU: this CPU run trains in float32", cfg["mixed_precision"])
    images = FeatureStore(probe["features"], modality="image")
    if images.labels is None:
        raise ValueError(f"feature store {images.path} has no labels (extract it with source.type=labelled)")
    source = images.meta.get("source", {})
    recorded = source.get("classes")  # folder names, or the ClassLabel names of an hf: dataset
    if not probe["class_names"] and not (is_hf_spec(source.get("path")) and recorded):
        raise ValueError(
            f"set probe.class_names=FILE for {images.path} (a store extracted from an hf: dataset with a ClassLabel "
            "column records its own class names)"
        )
    test_store = images
    if probe["test_features"]:  # opened before training: a wrong store fails at once
        test_store = FeatureStore(probe["test_features"], model=images.model, modality="image")
        theirs = test_store.meta.get("source", {}).get("classes")
        if test_store.labels is None or (recorded and theirs and theirs != recorded):
            why = "no labels" if test_store.labels is None else f"other classes than {images.path} ({theirs[:3]}...)"
            raise ValueError(f"probe.test_features={probe['test_features']!r}: the store has {why}")
    names = load_class_names(probe["class_names"] or recorded, recorded, probe["label_column"])
    train_cls, test_cls = class_split(names, probe["splits"], probe["test_fraction"], probe["split_seed"])
    text = class_text_features(cfg, names, accelerator.device)
    feats, labels = images.load_all(), images.labels
    seen = np.isin(labels, train_cls)
    log.info("probe: %d train classes (%d images), %d unseen test classes", len(train_cls), seen.sum(), len(test_cls))
    _, summary = fit(cfg, TensorPairs(feats[seen], text, labels[seen]), run_dir, accelerator)
    accelerator.end_training()  # no collective below; gloo threads left at exit can abort a worker
    # as the reference's train.py: the heads of the lowest validation loss (the last step's without validation)
    model = load_model(run_dir, accelerator.device)
    test_feats, test_labels = test_store.load_all(), test_store.labels
    results = {}
    for split, classes in (("unseen", test_cls), ("seen", train_cls)):
        mask = np.isin(test_labels, classes)
        if split == "seen" and test_store is images:
            continue  # the seen-class images were used for training
        remap = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([remap[int(c)] for c in test_labels[mask]])
        metrics = evaluate_features(model, test_feats[mask], y, model.encode_text(text[classes]))
        results.update({f"{split} {k}": v for k, v in metrics.items()})
    results.update(n_train_classes=len(train_cls), n_test_classes=len(test_cls), chance_top1=100.0 / len(test_cls))
    results["train_steps"] = summary["step"]
    if accelerator.is_main_process:
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        rows = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items())
        log.info("class-disjoint probe\n| metric | value |\n|---|---|\n%s", rows)
    return results


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "sharelock-probe", ImportError)


if __name__ == "__main__":
    cli()
