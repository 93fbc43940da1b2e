"""Atomic, pickle-free training checkpoints: safetensors for tensors, JSON for everything else.

Layout of ``<run>/checkpoints/step_000123/``: ``student.safetensors``, ``teacher.safetensors`` (backbone +
head), ``queue.safetensors``, ``optimizer.safetensors`` + ``optimizer.json``, ``rng_<rank>.safetensors`` +
``rng_<rank>.json`` and ``meta.json`` (step, resolved config). The directory is written under a temporary
name and renamed when complete, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from funai_common.weights import load_safetensors

STEP_DIR = re.compile(r"^step_(\d+)$")


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, path)


def checkpoint_dir(run_dir: str, step: int) -> str:
    """``<run_dir>/checkpoints/step_<step:06d>``: the directory of one checkpoint."""
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted((int(m.group(1)), n) for n in os.listdir(root) if (m := STEP_DIR.match(n)))
    return [os.path.join(root, n) for _, n in names]


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    """The checkpoint a run continues from: ``latest`` -> newest checkpoint of ``run_dir`` (an error without one),
    ``auto`` -> the same, or None (a fresh run) while there is none; a path -> that checkpoint; no resume -> None."""
    if resume is None or resume is False:
        return None
    if not isinstance(resume, str):  # train.resume=true reads as a YAML boolean
        raise ValueError(f"train.resume={resume!r}: expected latest, auto or the path of a checkpoint directory")
    if resume in ("latest", "auto"):
        found = list_checkpoints(run_dir)
        if not found and resume == "latest":
            raise FileNotFoundError(f"train.resume=latest: no checkpoint under {os.path.join(run_dir, 'checkpoints')}")
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, "meta.json")):
        raise FileNotFoundError(f"train.resume={resume!r} is not a checkpoint directory (expected {resume}/meta.json)")
    return resume


def set_aside_checkpoints(run_dir: str, step: int) -> list[str]:
    """Move the checkpoints of a run past ``step`` to ``checkpoints/abandoned/`` (replacing a folder of the same name
    there), where a run resumed from an older checkpoint starts another trajectory: they no longer count as its
    latest, nor get pruned in place of its own. Returns their new paths."""
    abandoned = os.path.join(run_dir, "checkpoints", "abandoned")
    moved = []
    for later in list_checkpoints(run_dir):
        if int(STEP_DIR.match(os.path.basename(later)).group(1)) > step:
            target = os.path.join(abandoned, os.path.basename(later))
            os.makedirs(abandoned, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(later, target)
            moved.append(target)
    return moved


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (safetensors) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                plain[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_to_files``: the optimizer state_dict rebuilt from its tensors and JSON rest."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["plain"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states of torch (CPU, CUDA), numpy and python."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()  # noqa: NPY002 (the global state is what third-party code uses)
    py_state = random.getstate()
    plain = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Restore the RNG states saved by ``rng_state`` (CUDA ones only where CUDA is available)."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    np_state = plain["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))  # noqa: NPY002
    py_state = plain["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))


def save_checkpoint(
    run_dir: str,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    rank: int = 0,
    barrier=lambda: None,
    keep: int | None = None,
) -> str:
    """Write checkpoint ``step``; call on every process (each stores its RNG state), rank 0 writes the rest."""
    final = checkpoint_dir(run_dir, step)
    tmp = os.path.join(run_dir, "checkpoints", f".tmp_step_{step:06d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    rng_tensors, rng_plain = rng_state()
    _save_tensors(rng_tensors, os.path.join(tmp, f"rng_{rank}.safetensors"))
    with open(os.path.join(tmp, f"rng_{rank}.json"), "w") as f:
        json.dump(rng_plain, f)
    if rank == 0:
        for name, module in modules.items():
            _save_tensors(module.state_dict(), os.path.join(tmp, f"{name}.safetensors"))
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        _save_tensors(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "optimizer.json"), "w") as f:
            json.dump(opt_meta, f)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, **meta}, f, indent=1)
    barrier()
    if rank == 0:
        replace_dir(tmp, final)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def replace_dir(new: str, target: str) -> None:
    """Put folder ``new`` at ``target``; an existing ``target`` (step 0 saved again by a run resumed there) is moved
    aside first and deleted only afterwards, so a crash never leaves a half-deleted checkpoint under its own name."""
    old = os.path.join(os.path.dirname(target), f".old_{os.path.basename(target)}")  # never matched by STEP_DIR
    if os.path.exists(target):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: str, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None, rank: int = 0
) -> dict[str, Any]:
    """Restore modules, optimizer and this process's RNG states from ``path``; returns meta.json. A module file
    that does not fit (another model size, head or queue length) is a ValueError naming the file and the keys."""
    for name, module in modules.items():
        file = os.path.join(path, f"{name}.safetensors")
        state, own = load_safetensors(file), module.state_dict()
        wrong = [
            f"{k} {tuple(v.shape)} (this run {tuple(own[k].shape)})"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        wrong += [f"{k} missing" for k in sorted(own.keys() - state.keys())]
        wrong += [f"{k} not in this run's {name}" for k in sorted(state.keys() - own.keys())]
        if wrong:
            raise ValueError(
                f"{file} does not fit this run's {name} ({len(wrong)} tensors, e.g. {'; '.join(wrong[:3])}): resume "
                f"with the model and loss settings the checkpoint was trained with (its meta.json config)"
            )
        module.load_state_dict(state)
    if optimizer is not None:
        with open(os.path.join(path, "optimizer.json")) as f:
            opt_meta = json.load(f)
        optimizer.load_state_dict(
            optimizer_from_files(load_safetensors(os.path.join(path, "optimizer.safetensors")), opt_meta)
        )
    rng_file = os.path.join(path, f"rng_{rank}.safetensors")
    if not os.path.exists(rng_file):
        rng_file = os.path.join(path, "rng_0.safetensors")
    with open(rng_file.replace(".safetensors", ".json")) as f:
        set_rng_state(load_safetensors(rng_file), json.load(f))
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def scaler_state(scaler) -> dict:
    """JSON state of the fp16 GradScaler (scale, growth tracker, factors); {} without one."""
    if scaler is None:
        return {}
    return {k: v.item() if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}
