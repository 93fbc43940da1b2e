"""fungi-eval: k-NN / few-shot / linear / clustering / retrieval table of embeddings vs FUNGI features (every block
combination).

fungi-eval features=runs/fungi/tiny/features.safetensors protocols=[knn,fewshot,clustering]
fungi-eval features=runs/fungi/flowers_dino_b16/features.safetensors protocols=[linear]   # lambda chosen on 'val'
fungi-eval features=runs/fungi/roxford5k_dino_vitb16/features.safetensors protocols=[retrieval]
"""

from __future__ import annotations

import json
from pathlib import Path

from fungi.config import resolve, run_cli, save_config
from fungi.data import ground_truth_path, load_ground_truth
from fungi.evaluation import check_lambda_split, evaluate_blocks, evaluate_retrieval, format_table
from fungi.retrieval import restrict_ground_truth
from fungi.runs import load_features, setup_logging

DEFAULTS = {
    "features": "runs/fungi/default/features.safetensors",
    "out": None,
    "train_split": "train",
    "val_split": "val",
    "test_split": "test",
    "protocols": ["knn", "fewshot", "linear"],
    "k": 20,
    "pca_dim": 512,
    "shots": 5,
    "linear_C": None,
    "incremental": False,
    "database_split": "database",
    "query_split": "queries",
    "ground_truth": None,
}
PROTOCOLS = ("knn", "fewshot", "linear", "clustering", "retrieval")


def ground_truth_file(cfg: dict, meta: dict) -> Path:
    """The revisited ground truth for retrieval: ``ground_truth`` if given, else
    ``<data.root>/<data.name>/gnd_<name>.pkl`` of the extraction config stored in the features file."""
    if cfg["ground_truth"]:
        return Path(cfg["ground_truth"])
    data = meta.get("config", {}).get("data", {})
    if data.get("kind") != "revisited" or not data.get("root") or not data.get("name"):
        raise ValueError(
            f"{cfg['features']} was not extracted from a revisited dataset (data.kind=revisited); pass "
            "ground_truth=<root>/<name>/gnd_<name>.pkl"
        )
    return ground_truth_path(data["root"], data["name"])


def retrieval_ground_truth(cfg: dict, splits: dict, meta: dict) -> tuple[list[dict], int, Path]:
    """Ground truth of the query rows in database rows (features labels = imlist / qimlist ids) -> (per-query
    'easy' / 'hard' / 'junk' row indices, entries dropped as absent from the database, ground-truth file)."""
    for split in (cfg["database_split"], cfg["query_split"]):
        if split not in splits:
            raise KeyError(f"split {split!r} not in {cfg['features']}; available: {sorted(splits)}")
    path = ground_truth_file(cfg, meta)
    gnd = load_ground_truth(path)["gnd"]
    database_ids, query_ids = splits[cfg["database_split"]][1], splits[cfg["query_split"]][1]
    return (*restrict_ground_truth(gnd, database_ids.tolist(), query_ids.tolist()), path)


def validation_features(cfg: dict, splits: dict) -> tuple | None:
    """(blocks, labels) of the split ``val_split`` that chooses the linear probe's lambda, or None to use an 80/20
    split of train: when ``val_split`` is null, or is the default 'val' and the file has no such split (features
    extracted without one). Another name that is absent, or the train or test split itself, is an error."""
    name = cfg["val_split"]
    if not name:
        return None
    if name in (cfg["train_split"], cfg["test_split"]):
        raise ValueError(f"val_split={name!r} is also the train or test split; the validation split must be another")
    if name not in splits:
        if name == DEFAULTS["val_split"]:
            return None
        raise KeyError(f"split {name!r} not in {cfg['features']}; available: {sorted(splits)} (or val_split=null)")
    return splits[name]


def merge_rows(rows: list[dict], extra: list[dict]) -> list[dict]:
    """Rows of two protocols joined on 'features' (order of ``rows``, then new combinations of ``extra``)."""
    merged = {r["features"]: dict(r) for r in rows}
    for r in extra:
        merged.setdefault(r["features"], {"features": r["features"]}).update(r)
    return list(merged.values())


def main(argv: list[str] | None = None) -> list[dict]:
    """Evaluate a features file; prints the table and writes ``metrics.json`` next to it (or to ``out``)."""
    cfg = resolve(argv, DEFAULTS, None)
    bad = sorted(set(cfg["protocols"]) - set(PROTOCOLS))
    if bad:
        raise ValueError(f"unknown protocols {bad}; expected a subset of {PROTOCOLS}")
    counts = {"k": {"knn", "fewshot"}, "shots": {"fewshot"}}  # k = 0 was scikit-learn's n_neighbors error
    for key, used_by in counts.items():
        if used_by & set(cfg["protocols"]) and cfg[key] is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ValueError(f"{key}={cfg[key]!r}: expected a positive integer (protocols {sorted(used_by)})")
    splits, meta = load_features(cfg["features"])
    retrieval = "retrieval" in cfg["protocols"]
    classification = any(p != "retrieval" for p in cfg["protocols"]) or not retrieval
    if classification:
        for split in (cfg["train_split"], cfg["test_split"]):
            if split not in splits:
                hint = "; retrieval features: protocols=[retrieval]" if cfg["database_split"] in splits else ""
                raise KeyError(f"split {split!r} not in {cfg['features']}; available: {sorted(splits)}{hint}")
    val = validation_features(cfg, splits) if classification and "linear" in cfg["protocols"] else None
    if classification and "linear" in cfg["protocols"] and cfg["linear_C"] is None and val is None:
        check_lambda_split(splits[cfg["train_split"]][1].numpy())
    if retrieval:  # checked before anything runs or is written
        ground_truth, dropped, gnd_path = retrieval_ground_truth(cfg, splits, meta)
    out = Path(cfg["out"] or Path(cfg["features"]).parent)
    log = setup_logging(out)
    save_config(cfg, out / "eval_config.yaml")
    rows = []
    if classification:
        train_blocks, train_labels = splits[cfg["train_split"]]
        test_blocks, test_labels = splits[cfg["test_split"]]
        if "linear" in cfg["protocols"] and cfg["linear_C"] is None:
            train = repr(cfg["train_split"])
            where = (
                f"an 80/20 split of {train} (no validation split), then refitted on all of it"
                if val is None
                else f"split {cfg['val_split']!r} ({len(val[1])} items), then fitted on {train} only"
            )
            log.info("linear probe: lambda chosen on %s", where)
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
            val_blocks=None if val is None else val[0],
            val_labels=None if val is None else val[1].numpy(),
        )
    if retrieval:
        (database_blocks, database_ids), (query_blocks, _) = splits[cfg["database_split"]], splits[cfg["query_split"]]
        log.info("retrieval: %d queries vs %d database images, %s", len(ground_truth), len(database_ids), gnd_path)
        if dropped:
            log.warning("%d ground-truth entries name images absent from the database features; ignored", dropped)
        found = evaluate_retrieval(database_blocks, query_blocks, ground_truth, cfg["pca_dim"], cfg["incremental"])
        rows = merge_rows(rows, found)
    log.info("\n%s", format_table(rows))
    with open(out / "metrics.json", "w") as f:  # a NaN (no query with positives) is written as null
        json.dump(json.loads(json.dumps(rows), parse_constant=lambda _: None), f, indent=2, allow_nan=False)
    return rows


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error for bad input (``main`` returns results)."""
    run_cli(main, "fungi-eval")


if __name__ == "__main__":
    cli()
