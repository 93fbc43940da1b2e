"""pin-train: learn the positional insert (or a VPT / LoRA baseline) on synthetic compositions, VLM frozen.

pin-train [--config blip2|openflamingo|tiny|PATH] [key=value ...] [--resume latest|auto|PATH]

`--resume auto` continues the run's latest checkpoint, or starts the run when it has none (requeued jobs).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from .checkpoint import (
    checkpoint_path,
    find_checkpoint,
    load_optimizer,
    load_scaler,
    load_state,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    set_aside_checkpoints,
    set_rng_state,
    step_folders,
)
from .config import dump_config, load_config, run_cli
from .methods import Method
from .pipeline import check_trained_with, codec_from_cfg, dataset_from_cfg, pools_from_cfg, training_loss, vlm_from_cfg
from .runlog import append_record, setup_logging, trim_records
from .synthetic import collate
from .validation import SyntheticValidation


def lr_at_epoch(cfg: dict, epoch: int) -> float:
    """MultiStepLR by epoch: lr * gamma^(number of milestones <= epoch)."""
    o = cfg["optim"]
    return o["lr"] * o["gamma"] ** sum(epoch >= m for m in o["milestones"])


def _positive_int(t: dict, key: str, optional: bool = False) -> None:
    """A ValueError naming `train.<key>` unless it is an integer >= 1 (or null when `optional`)."""
    value = t.get(key)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{key}={value!r}: expected a positive integer{' or null' if optional else ''}")


def train(cfg: dict, resume: str | None = None) -> dict:
    """Run training; returns {"losses", "validation" (one dict per validation), "run_dir", "step", "method", "vlm"}."""
    t = cfg["train"]
    for key in ("batch_size", "epochs", "checkpoint_every_epochs", "log_every"):
        _positive_int(t, key)
    _positive_int(t, "max_steps", optional=True)
    _positive_int(t, "keep_checkpoints", optional=True)
    mp = t["mixed_precision"] if torch.cuda.is_available() else "no"
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp)
    run_dir = Path(cfg["out_dir"]) / cfg["name"]
    if not resume and step_folders(run_dir / "checkpoints"):  # a fresh run would replace them
        raise ValueError(
            f"{run_dir} already holds the checkpoints of a run: continue it with --resume latest, or start a new "
            "run with another name= or out_dir="
        )
    log = setup_logging(run_dir, accelerator.is_main_process)
    if mp != t["mixed_precision"]:
        log.warning("train.mixed_precision=%s needs a GPU: this CPU run trains in float32", t["mixed_precision"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])  # noqa: NPY002 (seeds third-party code using the global RNG)
    torch.manual_seed(cfg["seed"])

    codec = codec_from_cfg(cfg)
    # the data (pools, backgrounds, validation sets) is read before the VLM is built or downloaded, so a bad path
    # fails in seconds; building it draws nothing from the global RNG, so the trajectory is unchanged
    train_pool, _, _ = pools_from_cfg(cfg)
    dataset = dataset_from_cfg(cfg, train_pool, "train")
    steps_per_epoch = len(dataset) // (t["batch_size"] * accelerator.num_processes)
    if steps_per_epoch == 0:
        raise ValueError(f"data.train_size={len(dataset)} is smaller than one global batch")
    total = (
        t["epochs"] * steps_per_epoch if t["max_steps"] is None else min(t["max_steps"], t["epochs"] * steps_per_epoch)
    )

    val_every = t.get("val_every_epochs")
    validation = SyntheticValidation(cfg, run_dir) if val_every else None
    ckpt = find_checkpoint(run_dir, resume) if resume else None
    if ckpt is not None:
        state, tensors = load_state(ckpt)
        check_trained_with(cfg, ckpt, "--resume", "resume")
        if state["step"] > total:  # before the VLM is built or downloaded
            raise ValueError(
                f"--resume: {ckpt} is at step {state['step']}, past this run's end at step {total} (train.max_steps="
                f"{t['max_steps']}, train.epochs={t['epochs']}); raise them to train further"
            )
    vlm = vlm_from_cfg(cfg)
    vlm.model.to(accelerator.device)
    method = Method(vlm, cfg["method"], cfg).to(accelerator.device)
    params = method.parameters()
    if not params:
        raise ValueError(f"method {cfg['method']!r} has nothing to train; use pin, vpt or lora")
    log.info(
        "method %s: %d trainable parameters (VLM frozen); %d process(es) on %s",
        cfg["method"],
        sum(p.numel() for p in params),
        accelerator.num_processes,
        accelerator.device,
    )
    # prepared so that fp16 runs step through accelerate's gradient scaler; no DDP wrapper: see the reduce below
    optimizer = accelerator.prepare_optimizer(
        torch.optim.Adam(params, lr=cfg["optim"]["lr"], weight_decay=cfg["optim"]["weight_decay"])
    )
    history: list[dict] = []

    step = 0
    if ckpt is not None:
        method.load_state_dict({k: v.to(accelerator.device) for k, v in load_weights(ckpt).items()}, source=ckpt)
        load_optimizer(optimizer, state["optimizer"], {k: v for k, v in tensors.items() if not k.startswith("rng.")})
        set_rng_state(state["rng"], {k: v for k, v in tensors.items() if k.startswith("rng.")})
        load_scaler(accelerator.scaler, state.get("scaler", {}))
        step = state["step"]
        log.info("resumed from %s at step %d", ckpt, step)
    metrics = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:  # after the resume: a refused one leaves the run's files as they were
        dump_config(cfg, run_dir / "config.yaml")
        for records in (metrics, run_dir / "validation.jsonl"):
            trim_records(records, step)
        moved = set_aside_checkpoints(run_dir, step)
        if moved:
            log.info("set aside %d checkpoints past step %d in %s", len(moved), step, moved[0].parent)

    # the last checkpoint and its step, known to every process (not only to the one that writes); a resumed run
    # starts at its checkpoint, so resuming a finished run writes nothing
    last = {"step": step if ckpt is not None else -1, "path": ckpt}

    def checkpoint(epoch: int) -> None:
        accelerator.wait_for_everyone()
        last.update(step=step, path=checkpoint_path(run_dir, step))
        if accelerator.is_main_process:
            path = save_checkpoint(
                run_dir, step, method.state_dict(), optimizer, {"step": step, "epoch": epoch}, cfg, accelerator.scaler
            )
            log.info("saved %s", path)
            prune_checkpoints(run_dir, t["keep_checkpoints"])

    losses: list[float] = []
    epochs_done = step // steps_per_epoch
    if validation is not None and step % steps_per_epoch == 0 and epochs_done and epochs_done % val_every == 0:
        if not validation.logged(step):  # the run was killed in the validation after its checkpoint: run it again
            history.append(validation.run(vlm, codec, method, accelerator, epochs_done - 1, step))
            log.info("validation after epoch %d: %s", epochs_done - 1, _fmt(history[-1]))
    method.train(True)
    bar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process, desc="pin-train")
    while step < total:
        epoch = step // steps_per_epoch
        dataset.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at_epoch(cfg, epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=t["batch_size"],
            shuffle=False,
            collate_fn=collate,
            num_workers=cfg["data"]["num_workers"],
            drop_last=True,
            # its own generator: starting an epoch must not draw from the global RNG (dropout, VPT/LoRA), or a run
            # resumed mid-epoch would draw once more than the straight run
            generator=torch.Generator().manual_seed(cfg["seed"] * 100_003 + epoch),
        )
        loader = accelerator.prepare_data_loader(loader)
        skip = step - epoch * steps_per_epoch
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        for batch in loader:
            with accelerator.autocast():
                loss = training_loss(vlm, codec, batch, accelerator.device)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at step {step}; last good checkpoint: {last['path'] or 'none'}"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                for p in params:
                    p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), "mean")
            optimizer.step()
            step += 1
            value = accelerator.reduce(loss.detach(), "mean").item()
            losses.append(value)
            bar.update(1)
            if step % t["log_every"] == 0:
                record = {"step": step, "epoch": epoch, "loss": value, "lr": optimizer.param_groups[0]["lr"]}
                if accelerator.is_main_process:
                    append_record(metrics, record)
                log.info("epoch %d step %d loss %.4f lr %.2e", epoch, step, value, record["lr"])
            every = t.get("checkpoint_every_steps")
            end_of_epoch = step % steps_per_epoch == 0
            if (every and step % every == 0) or (end_of_epoch and (epoch + 1) % t["checkpoint_every_epochs"] == 0):
                checkpoint(epoch)
            if validation is not None and end_of_epoch and (epoch + 1) % val_every == 0:
                history.append(validation.run(vlm, codec, method, accelerator, epoch, step))
                log.info("validation after epoch %d: %s", epoch, _fmt(history[-1]))
            if step >= total or end_of_epoch:
                break
    bar.close()
    if last["step"] != step:  # every process takes this branch alike (a folder check would race the writer)
        checkpoint(max(0, math.ceil(step / steps_per_epoch) - 1))
    accelerator.end_training()  # destroys the process group: gloo threads left at exit can abort a worker
    return {
        "losses": losses,
        "validation": history,
        "run_dir": str(run_dir),
        "step": step,
        "method": method,
        "vlm": vlm,
    }


def _fmt(row: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))


def main(argv: list[str] | None = None) -> dict:
    """pin-train: train with the config and key=value overrides (`resume=` to continue); returns `train`'s result."""
    cfg, positional = load_config(argv, flags=("resume",))
    if positional:
        raise ValueError(f"pin-train takes key=value overrides only, got {positional}")
    resume = cfg["_cli"].get("resume")
    return train(cfg, str(resume) if resume else None)


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "pin-train", ImportError, FloatingPointError)  # ImportError: an optional package


if __name__ == "__main__":
    cli()
