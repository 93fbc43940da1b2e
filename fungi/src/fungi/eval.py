"""fungi-eval: k-NN / few-shot / linear / clustering table of embeddings vs FUNGI features (every block combination).

fungi-eval features=runs/fungi/tiny/features.safetensors protocols=[knn,fewshot,clustering]
"""

from __future__ import annotations

import json
from pathlib import Path

from fungi.config import resolve, save_config
from fungi.evaluation import evaluate_blocks, format_table
from fungi.runs import load_features, setup_logging

DEFAULTS = {
    "features": "runs/fungi/default/features.safetensors",
    "out": None,
    "train_split": "train",
    "test_split": "test",
    "protocols": ["knn", "fewshot", "linear"],
    "k": 20,
    "pca_dim": 512,
    "shots": 5,
    "linear_C": None,
    "incremental": False,
}
PROTOCOLS = ("knn", "fewshot", "linear", "clustering")


def main(argv: list[str] | None = None) -> list[dict]:
    """Evaluate a features file; prints the table and writes ``metrics.json`` next to it (or to ``out``)."""
    cfg = resolve(argv, DEFAULTS, None)
    bad = sorted(set(cfg["protocols"]) - set(PROTOCOLS))
    if bad:
        raise ValueError(f"unknown protocols {bad}; expected a subset of {PROTOCOLS}")
    splits, _ = load_features(cfg["features"])
    for split in (cfg["train_split"], cfg["test_split"]):
        if split not in splits:
            raise KeyError(f"split {split!r} not in {cfg['features']}; available: {sorted(splits)}")
    out = Path(cfg["out"] or Path(cfg["features"]).parent)
    log = setup_logging(out)
    save_config(cfg, out / "eval_config.yaml")
    train_blocks, train_labels = splits[cfg["train_split"]]
    test_blocks, test_labels = splits[cfg["test_split"]]
    rows = evaluate_blocks(
        train_blocks,
        train_labels.numpy(),
        test_blocks,
        test_labels.numpy(),
        protocols=cfg["protocols"],
        k=cfg["k"],
        pca_dim=cfg["pca_dim"],
        shots=cfg["shots"],
        linear_C=cfg["linear_C"],
        incremental=cfg["incremental"],
    )
    log.info("\n%s", format_table(rows))
    with open(out / "metrics.json", "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error for bad input (``main`` returns results)."""
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise SystemExit(f"fungi-eval: error: {err}") from None


if __name__ == "__main__":
    cli()
