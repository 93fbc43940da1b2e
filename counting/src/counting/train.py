"""counting-train: UnCounTR on self-collages (accelerate; exact --resume; safetensors checkpoints)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from counting.checkpoint import (
    checkpoint_path,
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_aside_checkpoints,
    step_folders,
)
from counting.collage import CollageConfig, SelfCollageDataset, SelfCollageGenerator
from counting.config import load_config, make_dir, run_cli, save_config
from counting.losses import density_mse_loss
from counting.models import build_model
from counting.pools import FileObjectPool, sun397_backgrounds
from counting.synthetic import synthetic_backgrounds, synthetic_object_pool

log = logging.getLogger("counting")


def setup_logging(run_dir: Path | None, main_process: bool = True) -> None:
    """Python logging to stdout and ``<run_dir>/log.txt`` (main process only)."""
    log.handlers.clear()
    log.setLevel(logging.INFO if main_process else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)


def record_step(line: str) -> float:
    """The step of a JSON-lines record; infinity for a line cut short by a crash (dropped with the later steps)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def trim_records(path: Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` past ``step``, where a run (re)starts: a run resumed from an older
    checkpoint writes them again, so each step keeps one record."""
    if path.exists():
        text = path.read_text()
        kept = [r + "\n" for r in text.splitlines() if record_step(r) <= step]
        if "".join(kept) != text:  # via a temporary file: a kill while it is written loses no record
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)


def build_generator(cfg: dict) -> SelfCollageGenerator:
    """The collage generator of a config: preprocessed ImageNet pool + SUN397, or procedural objects."""
    data, collage = cfg["data"], CollageConfig.from_dict(cfg["collage"])
    if data["kind"] == "synthetic":
        objects = synthetic_object_pool(
            data["synthetic_types"], data["synthetic_per_type"], data["synthetic_object_size"], cfg["seed"]
        )
        backgrounds = synthetic_backgrounds(size=max(collage.img_size, 64), seed=cfg["seed"])
    elif data["kind"] == "imagenet":
        objects = FileObjectPool(data["image_root"], data["masks_dir"], data["clusters"])
        backgrounds = sun397_backgrounds(data["background_root"])
    else:
        raise ValueError(f"data.kind must be 'imagenet' or 'synthetic', got {data['kind']!r}")
    return SelfCollageGenerator(objects, backgrounds, collage)


def learning_rate(step: int, cfg: dict, steps_per_epoch: int) -> float:
    """Linear warmup over ``warmup_epochs`` then cosine to ``min_lr`` at ``scheduler_epochs`` (per-iteration)."""
    optim = cfg["optim"]
    warmup = optim["warmup_epochs"] * steps_per_epoch
    horizon = optim["scheduler_epochs"] * steps_per_epoch
    if step < warmup:
        return optim["lr"] * step / warmup
    progress = min((step - warmup) / max(horizon - warmup, 1), 1.0)
    return optim["min_lr"] + (optim["lr"] - optim["min_lr"]) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, cfg: dict, steps_per_epoch: int, rank: int, world: int) -> list[int]:
    """Dataset indices of this process's share of global batch ``step`` (an epoch = a seeded permutation)."""
    train = cfg["train"]
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng([cfg["seed"], epoch, 1]).permutation(train["samples_per_epoch"])
    batch = order[position * train["batch_size"] : (position + 1) * train["batch_size"]]
    return [int(epoch * train["samples_per_epoch"] + i) for i in batch[rank::world]]


def train_step_inputs(step: int, cfg: dict, rank: int, world: int) -> tuple[int, torch.Tensor]:
    """Shots of this step (one k ~ U{min_shots..max_shots} per batch) and this process's rows of the loss keep-mask.

    The Bernoulli keep-mask is drawn for the whole global batch from a generator seeded by (seed, step), so any
    number of processes trains on exactly the same masks; ``train.shared_mask`` draws one mask for all images.
    """
    rng = np.random.default_rng([cfg["seed"], step, 2])
    shots = int(rng.integers(cfg["train"]["min_shots"], cfg["collage"]["max_shots"] + 1))
    size, batch = cfg["collage"]["img_size"], cfg["train"]["batch_size"]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    draws = torch.rand((1 if cfg["train"]["shared_mask"] else batch, size, size), generator=generator)
    return shots, (draws < cfg["train"]["keep_prob"]).expand(batch, size, size)[rank::world]


# keys that a resume may change without changing the training trajectory
RESUME_FREE_KEYS = (
    "resume",
    "output_dir",
    "train.max_steps",
    "train.epochs",  # the end of the run only: the schedule runs over optim.scheduler_epochs
    "train.num_workers",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
)


def changed_settings(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (nested dicts compared key by key), sorted."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        name, old, new = f"{prefix}{key}", saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, f"{name}.")
        elif old != new:
            changed.append(name)
    return changed


def main(argv: list[str] | None = None) -> dict:
    """Train; returns {"run_dir", "losses" (per step of this invocation), "step"}."""
    cfg, rest = load_config(sys.argv[1:] if argv is None else argv)
    if rest:
        raise ValueError(f"unexpected arguments {rest}; use key=value overrides")
    train = cfg["train"]
    for key in ("batch_size", "samples_per_epoch", "epochs"):
        if type(train[key]) is not int or train[key] < 1:
            raise ValueError(f"train.{key}={train[key]!r}: expected a positive integer")
    max_steps = train["max_steps"]
    if max_steps is not None and (type(max_steps) not in (int, float) or max_steps < 1):
        raise ValueError(f"train.max_steps={train['max_steps']!r}: expected a positive integer, or null (no limit)")
    keep = train["keep_checkpoints"]
    if keep is not None and (type(keep) is not int or keep < 1):
        raise ValueError(f"train.keep_checkpoints={keep!r}: expected a positive integer, or null (keep all)")
    cuda = torch.cuda.is_available()  # CPU runs (gloo) as neco: two processes must not both think they are rank 0
    accelerator = Accelerator(cpu=not cuda, mixed_precision=train["mixed_precision"] if cuda else "no")
    run_dir = Path(cfg["output_dir"]) / cfg["name"]
    if not cfg["resume"] and step_folders(run_dir / "checkpoints"):  # a fresh run would replace them
        raise ValueError(
            f"{run_dir} already holds the checkpoints of a run: continue it with resume=latest, or start a new run "
            "with another name= or output_dir="
        )
    if accelerator.is_main_process:
        make_dir(run_dir, "output_dir/name")
    setup_logging(run_dir, accelerator.is_main_process)
    if not cuda and train["mixed_precision"] != "no":
        log.warning("train.mixed_precision=%s needs a GPU: this CPU run trains in float32", train["mixed_precision"])
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2**32)  # noqa: NPY002 (third-party code may use the global state)

    model = build_model(cfg["model"])
    params = [p for p in model.parameters() if p.requires_grad]
    optim = cfg["optim"]
    optimizer = torch.optim.AdamW(params, lr=optim["lr"], weight_decay=optim["weight_decay"], betas=optim["betas"])
    steps_per_epoch = train["samples_per_epoch"] // train["batch_size"]
    if steps_per_epoch == 0:
        raise ValueError(f"samples_per_epoch ({train['samples_per_epoch']}) < batch_size ({train['batch_size']})")
    total_steps = train["epochs"] * steps_per_epoch
    if train["max_steps"] is not None:
        total_steps = min(total_steps, int(train["max_steps"]))
    start = 0
    path = last_checkpoint = find_checkpoint(run_dir, str(cfg["resume"])) if cfg["resume"] else None
    if path is not None:
        state = load_checkpoint(path, model, optimizer)
        start = state["step"]
        if start > total_steps:
            raise ValueError(
                f"--resume: {path} is at step {start}, past this run's end at step {total_steps} (train.max_steps="
                f"{train['max_steps']}, train.epochs={train['epochs']}); raise them to train further"
            )
        changed = [k for k in changed_settings(state.get("config", {}), cfg) if k not in RESUME_FREE_KEYS]
        if changed:  # allowed (e.g. a fine-tuning stage), but the run no longer continues the same trajectory
            log.warning("resuming %s with other settings than it was trained with: %s", path, changed)
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s at step %d", path, start)
    metrics = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:  # after the resume: a failed one leaves the run's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")
        trim_records(metrics, start)
        moved = set_aside_checkpoints(run_dir, start)
        if moved:
            log.info("set aside %d checkpoints past step %d in %s", len(moved), start, moved[0].parent)
    model, optimizer = accelerator.prepare(model, optimizer)

    dataset = SelfCollageDataset(build_generator(cfg), train["samples_per_epoch"], cfg["seed"])
    rank, world = accelerator.process_index, accelerator.num_processes
    if train["batch_size"] % world:
        raise ValueError(f"train.batch_size={train['batch_size']} must be divisible by the {world} processes")
    batches = [batch_indices(s, cfg, steps_per_epoch, rank, world) for s in range(start, total_steps)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=train["num_workers"])
    log.info(
        "training %s: steps %d..%d, %d steps/epoch, %d processes",
        cfg["name"],
        start,
        total_steps,
        steps_per_epoch,
        world,
    )

    losses: list[float] = []
    model.train()
    bar = tqdm(total=total_steps, initial=start, disable=not accelerator.is_main_process, desc="train")
    for step, batch in zip(range(start, total_steps), loader):
        lr = learning_rate(step, cfg, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        shots, keep_mask = train_step_inputs(step, cfg, rank, world)
        device = accelerator.device
        with accelerator.autocast():
            pred = model(batch["image"].to(device), batch["exemplars"][:, :shots].to(device))
        target = batch["density"].to(device)
        loss = density_mse_loss(
            pred.float(),
            target,
            keep_mask=keep_mask,
            standard_size=train["standard_size"],
            target_all=batch["density_all"].to(device),
            keep_all_objects=train["keep_all_object_pixels"],
            distractor_weight=train["distractor_weight"],
            density_scaling=cfg["collage"]["density_scaling"],
        )
        if not torch.isfinite(accelerator.reduce(loss.detach(), reduction="sum")):  # every process stops alike
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {step}; stopping (last good checkpoint: "
                f"{last_checkpoint or 'none'})"
            )
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(accelerator.reduce(loss.detach(), reduction="mean"))
        losses.append(loss_value)
        bar.update(1)
        done = step + 1
        if done % train["log_every"] == 0 or done == total_steps:
            scale = cfg["collage"]["density_scaling"]
            counts = (pred.detach().sum((1, 2)) / scale).clamp_min(0)  # the reference clips counts at 0
            mae = float((counts - batch["count"].to(device)).abs().mean())
            if accelerator.is_main_process:
                record = {"step": done, "loss": loss_value, "train_batch_mae": mae, "lr": lr, "shots": shots}
                with open(metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            log.info("step %d loss %.5f train-batch MAE %.2f lr %.2e shots %d", done, loss_value, mae, lr, shots)
        if done % train["checkpoint_every"] == 0 or done == total_steps:
            last_checkpoint = checkpoint_path(run_dir, done)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    run_dir,
                    done,
                    accelerator.unwrap_model(model),
                    optimizer,
                    cfg,
                    {"loss": loss_value},
                    accelerator.scaler,
                )
                prune_checkpoints(run_dir, keep)
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: gloo threads left at exit can abort a worker
    return {"run_dir": str(run_dir), "losses": losses, "step": total_steps}


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "counting-train", FloatingPointError)


if __name__ == "__main__":
    cli()
