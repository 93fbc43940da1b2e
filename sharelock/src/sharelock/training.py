"""Optimiser, LR schedule and exact-resume checkpoints (safetensors + JSON, no pickle)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from funai_common.weights import load_safetensors
from sharelock.config import read_json, save_config
from sharelock.models import META_FILE, MODEL_FILE, step_folders


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear from 0 at step 0 to 1 at `warmup_steps`, then half a cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def constant(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier 1 at every step: the reference's `lr_schedule: constant` attaches no scheduler, so no warmup."""
    return 1.0


def warmup_constant(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup from 0, then constant."""
    return min(1.0, step / max(1, warmup_steps))


SCHEDULES = {"cosine": warmup_cosine, "constant": constant, "constant_with_warmup": warmup_constant}


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_steps: int = 150,
    total_steps: int = 5000,
    schedule: str = "cosine",
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam with coupled L2 weight decay (the reference; not AdamW) and a per-optimizer-step LambdaLR schedule.

    After `k` calls of `scheduler.step()` the LR is `lr * f(k)` with f = linear warmup from 0 (LR 0 at step 0) to 1
    at `warmup_steps`, then half a cosine to 0 at `total_steps` (`schedule="constant"`: the reference's constant LR
    from step 0, no warmup; `"constant_with_warmup"`: the linear warmup, then 1).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {sorted(SCHEDULES)}")
    fn = SCHEDULES[schedule]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: fn(step, warmup_steps, total_steps))
    return optimizer, scheduler


# --------------------------------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) snapshot of the python, numpy and torch (CPU + CUDA) generators."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    py = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the global generator is what user code seeds)
    info = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, info


def set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Restore the generators saved by `rng_state`."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = info["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = info["numpy"]
    legacy = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    np.random.set_state(legacy)  # noqa: NPY002


# ------------------------------------------------------------------------------------------ optimizer state
def optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict from `optimizer_to_safetensors` output."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    cfg: dict,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp name then rename): model weights (safetensors), meta (JSON),
    the resolved config, and optionally optimizer/scheduler/RNG/loop state for exact resume."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / MODEL_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    save_config(cfg, tmp / "config.yaml")
    if optimizer is not None:
        tensors, optim_info = optimizer_to_safetensors(optimizer)
        rng_tensors, rng_info = rng_state()
        tensors.update(rng_tensors)
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        full = {
            "optimizer": optim_info,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_info,
            "loop": state or {},
        }
        (tmp / "trainer_state.json").write_text(json.dumps(full))
    replace_dir(tmp, directory)
    return directory


def replace_dir(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``; an existing ``target`` is moved aside first and deleted only afterwards, so a
    crash leaves either folder complete (the old one as ``.old_<target name>``)."""
    old = target.with_name(f".old_{target.name}")  # hidden: never matched by step_* lookups
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(
    directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from `directory`; returns the saved loop state."""
    directory = Path(directory)
    if not (directory / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{directory} is not a resumable checkpoint (no trainer_state.json)")
    try:
        model.load_state_dict(load_safetensors(directory / MODEL_FILE))
    except RuntimeError as err:  # torch lists every mismatch on its own line
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ValueError(f"checkpoint {directory} does not fit the heads of this config (model.*): {first}") from None
    tensors = load_safetensors(directory / "trainer_state.safetensors")
    full = json.loads((directory / "trainer_state.json").read_text())
    optimizer.load_state_dict(optimizer_from_safetensors(tensors, full["optimizer"]))
    if scheduler is not None and full["scheduler"] is not None:
        scheduler.load_state_dict(full["scheduler"])
    set_rng_state(tensors, full["rng"])
    return full["loop"]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest `checkpoints/step_<N>` directory of a run by step number, or None."""
    steps = step_folders(Path(run_dir) / "checkpoints")
    return steps[-1] if steps else None


def resume_checkpoint(run_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint a run continues from: `latest` the run's newest (an error without one), `auto` the newest or
    None without one (a fresh start: requeued jobs pass the same command every time), a path that path; None
    without `resume`."""
    if resume not in ("latest", "auto"):
        return Path(resume) if resume else None
    path = latest_checkpoint(run_dir)
    if path is None and resume == "latest":  # as pin, neco and counting: a misspelt run_dir would start a new run
        raise FileNotFoundError(
            f"resume=latest: no checkpoint under {Path(run_dir) / 'checkpoints'} (leave resume out, or resume=auto, "
            "to start a new run)"
        )
    return path


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> None:
    """Delete all but the `keep` newest step checkpoints of a run (None keeps all; `best` is no step checkpoint); a
    resumed run has set the later ones aside (`set_aside_checkpoints`), so the one it has just written is the newest."""
    if keep is None:
        return
    for old in step_folders(Path(run_dir) / "checkpoints")[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def set_aside_checkpoints(run_dir: str | Path, step: int) -> list[Path]:
    """Move the step checkpoints of a run past ``step``, and `best` when it was written past it, to
    ``checkpoints/abandoned/`` (replacing a folder of the same name there), where a run resumed from an older checkpoint
    starts another trajectory: they no longer count as its latest or best, nor get pruned in place of its own.
    Returns their new paths."""
    ckpts = Path(run_dir) / "checkpoints"
    later = [p for p in step_folders(ckpts) if int(p.name[5:]) > step]
    if (ckpts / "best" / META_FILE).is_file() and read_json(ckpts / "best" / META_FILE)["step"] > step:
        later.append(ckpts / "best")
    moved = []
    for folder in later:
        (ckpts / "abandoned").mkdir(exist_ok=True)
        shutil.rmtree(ckpts / "abandoned" / folder.name, ignore_errors=True)
        moved.append(folder.rename(ckpts / "abandoned" / folder.name))
    return moved


def record_step(line: str) -> float:
    """The step of a JSON-lines record; infinity for a line cut short by a crash (dropped with the later steps)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def trim_records(path: Path, step: int) -> None:
    """Drop the records of a JSON-lines file past ``step``, where a run (re)starts: a run resumed from an older
    checkpoint writes them again, so each step keeps one record."""
    if path.exists():
        text = path.read_text()
        kept = [r + "\n" for r in text.splitlines() if record_step(r) <= step]
        if "".join(kept) != text:  # via a temporary file: a kill while it is written loses no record
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
