"""`sharelock-train`: fit the ShareLock heads on cached features (accelerate; exact resume; early stopping)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from sharelock.config import check_output_dir, flatten, load_config, run_cli, save_config
from sharelock.losses import clip_loss
from sharelock.models import META_FILE, ShareLock, step_folders
from sharelock.pairs import StorePairs, Subset, split_per_dataset, subsample
from sharelock.store import FeatureStore
from sharelock.training import (
    build_optimizer,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    set_aside_checkpoints,
    trim_records,
)

log = logging.getLogger("sharelock")


def setup_logging(run_dir: Path | None, main_process: bool = True) -> None:
    """Log to stdout and `<run_dir>/log.txt` (main process only)."""
    root = logging.getLogger("sharelock")
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    root.propagate = False
    if run_dir is not None:
        check_output_dir(run_dir)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)


def positive_int(cfg: dict, dotted: str, optional: bool = False) -> int | None:
    """The config value at `a.b`; a ValueError naming the key unless it is an integer >= 1 (or null if `optional`)."""
    value: Any = cfg
    for part in dotted.split("."):
        value = value[part]
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{dotted}={value!r}: expected a positive integer{' or null' if optional else ''}")
    return value


def check_fresh_run(run_dir: Path, resume: str | None) -> None:
    """Refuse to start a run from scratch in a folder that holds another run's checkpoints: the new run would
    truncate its metrics and replace its checkpoints (`best` at the first validation)."""
    ckpts = run_dir / "checkpoints"
    if not resume and (step_folders(ckpts) or (ckpts / "best").is_dir()):  # abandoned/ alone: steps set aside
        raise ValueError(
            f"{run_dir} already holds the checkpoints of a run: continue it with --resume latest, or start a new "
            "run with another name= or run_dir="
        )


# settings a resumed run must share with its checkpoint: what the heads' weights mean (dropout aside), and the
# train/validation split the remaining steps continue; its global batch is checked from meta.json (another split of it
# into processes and accumulated micro-batches trains the same run)
RESUME_FIXED = (
    "seed", "model.text_layers", "model.hidden_dim", "model.vision_layers", "model.embedding_dim",
    "model.vision_normalize", "model.text_normalize", "data.val_size", "data.split_seed", "data.train_size",
)  # fmt: skip


def check_resume_options(path: Path, cfg: dict, global_batch: int) -> None:
    """Refuse to resume a checkpoint whose recorded config has other `RESUME_FIXED` settings than `cfg`, or whose
    meta.json records another global batch: a ValueError listing each key with both values (before, another seed or
    normalisation resumed silently)."""
    if not (path / "config.yaml").is_file():
        return
    with open(path / "config.yaml") as f:
        saved = flatten(yaml.safe_load(f) or {})
    current = flatten(cfg)
    diffs = [
        f"{key}={current[key]!r} (checkpoint: {saved[key]!r})"
        for key in RESUME_FIXED
        if key in saved and current[key] != saved[key]  # keys an older checkpoint lacks are not checked
    ]
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    if meta.get("global_batch", global_batch) != global_batch:
        diffs.append(
            f"global batch {global_batch} = optim.batch_size x optim.accumulate_grad_batches x processes "
            f"(checkpoint: {meta['global_batch']})"
        )
    if diffs:
        raise ValueError(
            f"resume: {path} was trained with other settings: {'; '.join(diffs)}; resume it with its run's config "
            f"(--config {path / 'config.yaml'}) or the same overrides"
        )


def check_eval_stores(cfg: dict) -> bool:
    """Whether the run ends with a zero-shot test (`eval.*`); both stores are opened first, so that one that is
    missing, unlabelled or given alone fails before training, not after it (or silently)."""
    features, class_features = cfg["eval"]["features"], cfg["eval"]["class_features"]
    if bool(features) != bool(class_features):
        given, missing = ("features", "class_features") if features else ("class_features", "features")
        raise ValueError(f"eval.{given}={cfg['eval'][given]!r}: the zero-shot test after training needs eval.{missing}")
    if not features:
        return False
    if FeatureStore(features, modality="image").labels is None:
        raise ValueError(f"eval.features={features!r}: the store has no labels (extract it with source.type=labelled)")
    FeatureStore(class_features, modality="text")
    return True


def build_model(cfg: dict, vision_dim: int, text_dim: int) -> ShareLock:
    """ShareLock heads from the `model` section of a config."""
    m = cfg["model"]
    return ShareLock(
        vision_dim,
        text_dim,
        text_layers=m["text_layers"],
        hidden_dim=m["hidden_dim"],
        vision_layers=m["vision_layers"],
        embedding_dim=m["embedding_dim"],
        dropout=m["dropout"],
        vision_normalize=m["vision_normalize"],
        text_normalize=m["text_normalize"],
    )


@torch.no_grad()
def validation_loss(model, pairs, batch_size: int, logit_scale: float, seed: int, device) -> float:
    """Mean contrastive loss over `pairs` in batches of `batch_size` (eval mode), weighted by batch size."""
    model.eval()
    rng = np.random.default_rng([seed, 2])
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        idx = np.arange(start, min(len(pairs), start + batch_size))
        v, t = pairs.batch(idx, rng)
        zv, zt = model(v.to(device), t.to(device))
        total += clip_loss(zv, zt, logit_scale).item() * len(idx)
        count += len(idx)
    model.train()
    return total / max(1, count)


def fit(
    cfg: dict, pairs, run_dir: Path, accelerator: Accelerator, extra_meta: dict | None = None
) -> tuple[ShareLock, dict[str, Any]]:
    """Train ShareLock heads on `pairs` (StorePairs/TensorPairs) with the config's recipe; returns (model, summary).
    The resolved config goes to `<run_dir>/config.yaml` once the resume checks have passed (a refused resume leaves
    the run's own in place).

    The data order is a function of (seed, epoch) and the caption choice of (seed, micro-batch), so a resumed run
    replays the same batches; model, optimizer, scheduler, RNG and early-stopping states come from the checkpoint.
    """
    opt_cfg = cfg["optim"]
    for key in ("optim.max_steps", "val_check_interval", "checkpoint_every", "log_every"):
        positive_int(cfg, key)
    bs, accum = positive_int(cfg, "optim.batch_size"), positive_int(cfg, "optim.accumulate_grad_batches")
    keep = positive_int(cfg, "keep_checkpoints", optional=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_idx, val_idx = split_per_dataset(pairs, cfg["data"]["val_size"], cfg["data"]["split_seed"])
    train_idx = subsample(train_idx, cfg["data"].get("train_size"), cfg["data"]["split_seed"])
    train, val = Subset(pairs, train_idx), Subset(pairs, val_idx)
    per_epoch = len(train) // (bs * world)
    if per_epoch == 0:
        raise ValueError(f"{len(train)} training samples cannot fill one batch of {bs} x {world} processes")
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, pairs.vision_dim, pairs.text_dim)
    optimizer, scheduler = build_optimizer(
        model.parameters(),
        lr=opt_cfg["lr"],
        weight_decay=opt_cfg["weight_decay"],
        warmup_steps=opt_cfg["warmup_steps"],
        total_steps=opt_cfg["max_steps"],
        schedule=opt_cfg["schedule"],
    )
    logit_scale = float(torch.tensor(cfg["loss"]["log_logit_scale"], dtype=torch.float32).exp())
    state = {"step": 0, "best_val": math.inf, "es_best": math.inf, "es_wait": 0, "stopped": False, "history": []}
    path = resume_checkpoint(run_dir, cfg.get("resume"))
    if path is not None:
        check_resume_options(path, cfg, bs * accum * world)
        state.update(load_trainer_state(path, model, optimizer, scheduler))
        if state["step"] > opt_cfg["max_steps"]:
            raise ValueError(
                f"resume: {path} is at step {state['step']}, past this run's end at optim.max_steps="
                f"{opt_cfg['max_steps']}; raise it to train further"
            )
        log.info("resumed from %s at step %d", path, state["step"])
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    meta = {"model": accelerator.unwrap_model(model).config, "backbones": pairs.backbones(), **(extra_meta or {})}
    ckpt_dir = run_dir / "checkpoints"

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(
                ckpt_dir / f"step_{state['step']:06d}", accelerator.unwrap_model(model),
                {**meta, "step": state["step"], "global_batch": bs * accum * world}, cfg, optimizer, scheduler, state,
            )  # fmt: skip
            prune_checkpoints(run_dir, keep)

    def validate() -> None:
        val_loss = validation_loss(model, val, bs, logit_scale, cfg["seed"], device)
        # every rank must take the same early-stopping decision: use the mean over ranks
        val_loss = accelerator.reduce(torch.tensor(val_loss, device=device), reduction="mean").item()
        state["history"].append({"step": state["step"], "micro_batch": micro, "val_loss": val_loss})
        log.info("step %d validation_loss %.4f", state["step"], val_loss)
        if val_loss < state["best_val"]:
            state["best_val"] = val_loss
            if accelerator.is_main_process:
                best_meta = {**meta, "step": state["step"], "val_loss": val_loss}
                save_checkpoint(ckpt_dir / "best", accelerator.unwrap_model(model), best_meta, cfg)
        es = cfg["early_stopping"]
        if val_loss < state["es_best"] - es["min_delta"]:
            state["es_best"], state["es_wait"] = val_loss, 0
        else:
            state["es_wait"] += 1
            if state["es_wait"] >= es["patience"]:
                state["stopped"] = True
                log.info("early stopping: no improvement > %g in %d validations", es["min_delta"], es["patience"])

    metrics_file = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        trim_records(metrics_file, state["step"])
        moved = set_aside_checkpoints(run_dir, state["step"])
        if moved:
            log.info("set aside %d checkpoints past step %d in %s", len(moved), state["step"], moved[0].parent)
        if any(p.name == "best" for p in moved):  # its value came from the abandoned steps: the next validation wins
            state["best_val"] = math.inf
    model.train()
    bar = tqdm(total=opt_cfg["max_steps"], initial=state["step"], desc="train", disable=not accelerator.is_main_process)
    loss_value: float | None = None  # stays None when no step runs (a run resumed at max_steps)
    perms: dict[int, np.ndarray] = {}
    while state["step"] < opt_cfg["max_steps"] and not state["stopped"]:
        losses = []
        for a in range(accum):
            micro = state["step"] * accum + a
            epoch, pos = divmod(micro, per_epoch)
            if epoch not in perms:  # one permutation per epoch, identical on every rank
                perms = {epoch: np.random.default_rng([cfg["seed"], epoch]).permutation(len(train))}
            perm = perms[epoch]
            start = (pos * world + rank) * bs
            v, t = train.batch(perm[start : start + bs], np.random.default_rng([cfg["seed"], 1, micro, rank]))
            sync = contextlib.nullcontext() if a == accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                zv, zt = model(v.to(device), t.to(device))
                loss = clip_loss(zv.float(), zt.float(), logit_scale)
                accelerator.backward(loss / accum)
            losses.append(loss.detach())
            if len(val) and (micro + 1) % cfg["val_check_interval"] == 0:  # val_size=0: nothing to validate
                validate()
        loss_value = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()  # mean over ranks
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"non-finite training loss {loss_value} at step {state['step']}; last good checkpoint: "
                f"{latest_checkpoint(run_dir) or 'none'}"
            )
        if opt_cfg["grad_clip"]:
            accelerator.clip_grad_norm_(model.parameters(), opt_cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update(1)
        if accelerator.is_main_process:
            record = {"step": state["step"], "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if state["step"] % cfg["log_every"] == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}")
                log.info("step %d loss %.4f lr %.3g", state["step"], loss_value, record["lr"])
        if state["step"] % cfg["checkpoint_every"] == 0 or state["step"] == opt_cfg["max_steps"]:
            checkpoint()
    bar.close()
    if state["stopped"] and state["step"] % cfg["checkpoint_every"]:
        checkpoint()
    accelerator.wait_for_everyone()
    best = state["best_val"] if math.isfinite(state["best_val"]) else None  # None: no validation ran
    summary = {"step": state["step"], "train_samples": len(train), "train_loss": loss_value, "best_val_loss": best}
    return accelerator.unwrap_model(model), summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of `sharelock-train`; returns a summary dict (also written to `<run>/summary.json`)."""
    cfg = load_config(sys.argv[1:] if argv is None else argv, "default")
    cuda = torch.cuda.is_available()  # CPU processes (gloo) must form one job, not several rank-0 runs
    accelerator = Accelerator(cpu=not cuda, mixed_precision=cfg["mixed_precision"] if cuda else "no")
    run_dir = Path(cfg["run_dir"] or Path("runs") / "sharelock" / cfg["name"])
    check_fresh_run(run_dir, cfg.get("resume"))
    setup_logging(run_dir, accelerator.is_main_process)
    if not cuda and cfg["mixed_precision"] != "no":
        log.warning("mixed_precision=%s needs a GPU: this CPU run trains in float32", cfg["mixed_precision"])
    pairs = StorePairs(cfg["data"]["datasets"], in_memory=cfg["data"]["in_memory"])
    run_eval = check_eval_stores(cfg)
    log.info(
        "%d pairs, vision dim %d, text dim %d, %d process(es)",
        len(pairs),
        pairs.vision_dim,
        pairs.text_dim,
        accelerator.num_processes,
    )
    model, summary = fit(cfg, pairs, run_dir, accelerator)
    accelerator.end_training()  # the evaluation below runs on the main process alone; gloo threads at exit can abort
    if run_eval and accelerator.is_main_process:
        from sharelock.eval import evaluate_stores
        from sharelock.models import load_model

        best = load_model(run_dir, accelerator.device)
        summary.update(evaluate_stores(best, cfg["eval"]["features"], cfg["eval"]["class_features"]))
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %s", summary)
    return summary


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "sharelock-train", FloatingPointError)


if __name__ == "__main__":
    cli()
