"""Checkpoints: a directory per step with safetensors weights / optimiser tensors and JSON metadata (no pickle)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from counting.models import UnCounTR
from funai_common.weights import load_safetensors


def model_state(model: UnCounTR, with_backbone: bool) -> dict[str, torch.Tensor]:
    """Trainable head weights (+ the frozen backbone's when it cannot be rebuilt from a timm name)."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if with_backbone or not k.startswith("backbone.")
    }


def load_model_weights(model: UnCounTR, path: str | Path) -> None:
    """Load ``model.safetensors`` of a checkpoint directory (or the file itself) into ``model``."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint weights {file} not found")
    state = load_safetensors(file)
    own = model.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if shapes:
        raise ValueError(
            f"checkpoint {file} does not fit the model of the config ({len(shapes)} shape mismatches, checkpoint vs "
            f"model, e.g. {shapes[:3]}): another model size?"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {file} does not match the model: missing {missing}, unexpected {unexpected}")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into flat tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of ``optimizer_tensors``: load the flat tensors and the JSON remainder back into ``optimizer``."""
    state = {int(pid): dict(entries) for pid, entries in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state[int(pid)][name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON meta) of the RNG states: torch CPU as a tensor, numpy's global and python's as JSON."""
    np_state = np.random.get_state()  # noqa: NPY002 (the global legacy state is what resume must restore)
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return {"torch": torch.get_rng_state()}, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore the torch CPU, numpy global and python RNG states saved by ``rng_state``."""
    torch.set_rng_state(tensors["torch"])
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/checkpoints/step_XXXXXX``: the folder of the checkpoint at ``step``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: UnCounTR,
    optimizer: torch.optim.Optimizer,
    cfg: dict,
    metrics: dict,
    scaler=None,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically (temporary name, then rename); ``scaler`` is the fp16
    GradScaler, if any."""
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with_backbone = not cfg["model"].get("pretrained", True) and not cfg["model"].get("checkpoint_path")
    save_file(model_state(model, with_backbone), str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"step": step, "config": cfg, "optimizer": opt_meta, "rng": rng_meta, "metrics": metrics}
    state["scaler"] = scaler_state(scaler)
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def step_folders(checkpoints: Path) -> list[Path]:
    """The ``step_<N>`` folders of ``checkpoints`` by step number (by name, step_1000000 came before step_999999)."""
    found = [p for p in Path(checkpoints).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """``latest`` (highest step under run_dir/checkpoints; an error without one), ``auto`` (the same, or None without
    one: a fresh start, as requeued jobs pass the same command every time) or an explicit checkpoint directory."""
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: no checkpoint (state.json) in that directory")
        return path
    candidates = step_folders(Path(run_dir) / "checkpoints")
    if not candidates and resume == "latest":
        raise FileNotFoundError(
            f"--resume latest: no checkpoint under {Path(run_dir) / 'checkpoints'} (leave resume out, or resume=auto, "
            "to start a new run)"
        )
    return candidates[-1] if candidates else None


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest step checkpoints of a run (None keeps all); a resumed run has set
    the later ones aside (``set_aside_checkpoints``), so the one it has just written is the newest."""
    if keep is None:
        return
    for old in step_folders(Path(run_dir) / "checkpoints")[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def set_aside_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Move the step checkpoints of a run past ``step`` to ``checkpoints/abandoned/`` (replacing a folder of the same
    name there), where a run resumed from an older checkpoint starts another trajectory: they no longer count as its
    latest, nor get pruned in place of its own. Returns their new paths."""
    abandoned = Path(run_dir) / "checkpoints" / "abandoned"
    moved = []
    for later in [p for p in step_folders(Path(run_dir) / "checkpoints") if int(p.name[5:]) > step]:
        abandoned.mkdir(exist_ok=True)
        shutil.rmtree(abandoned / later.name, ignore_errors=True)
        moved.append(later.rename(abandoned / later.name))
    return moved


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or the latest checkpoint when it is a run folder (``<run>/checkpoints/step_*``), as
    neco-eval and sharelock-eval take a run folder."""
    path = Path(path)
    if path.is_dir() and not (path / "state.json").is_file() and (path / "checkpoints").is_dir():
        found = step_folders(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"run folder {path} holds no checkpoint under {path / 'checkpoints'}")
        return found[-1]
    return path


def load_checkpoint(path: Path, model: UnCounTR, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore weights (+ optimiser and RNG states); returns state.json's content."""
    state = json.loads((Path(path) / "state.json").read_text())
    load_model_weights(model, path)
    if optimizer is not None:
        restore_optimizer(optimizer, load_safetensors(Path(path) / "optimizer.safetensors"), state["optimizer"])
        restore_rng(load_safetensors(Path(path) / "rng.safetensors"), state["rng"])
    return state


def scaler_state(scaler) -> dict:
    """JSON state of the fp16 GradScaler (scale, growth tracker, factors); {} without one."""
    if scaler is None:
        return {}
    return {k: v.item() if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}
