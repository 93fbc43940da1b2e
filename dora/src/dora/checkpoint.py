"""Atomic checkpoints: safetensors for tensors, JSON for everything else (never pickle)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from funai_common.weights import load_safetensors

STEP_DIR = re.compile(r"^step_(\d+)$")


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into flat tensors and a JSON-able remainder."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
                meta["state"][str(pid)][name] = "tensor"
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_to_flat`."""
    state = {}
    for pid, pstate in meta["state"].items():
        state[int(pid)] = {n: tensors[f"{pid}.{n}"] if v == "tensor" else v for n, v in pstate.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) RNG states as JSON-able values."""
    np_state = np.random.get_state()  # noqa: NPY002  (the legacy global RNG is what user code may use)
    out = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))  # noqa: NPY002
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    ckpt_dir: Path,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    state: dict,
    config: dict,
    extra: dict | None = None,
) -> Path:
    """Write the checkpoint files into ``tmp_path(ckpt_dir)`` (main process); every process then adds its RNG file
    (:func:`write_rng`) and :func:`finalize_checkpoint` renames the folder, so a checkpoint is complete or absent."""
    tmp = tmp_path(ckpt_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state_dict(student), str(tmp / "student.safetensors"))
    save_file(_state_dict(teacher), str(tmp / "teacher.safetensors"))
    save_file(_state_dict(loss_fn), str(tmp / "loss.safetensors"))
    tensors, meta = optimizer_to_flat(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "state.json").write_text(json.dumps({**state, **(extra or {}), "config": config}, indent=1))
    return tmp


def tmp_path(ckpt_dir: Path) -> Path:
    """The temporary folder a checkpoint is written to before renaming."""
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.with_name(ckpt_dir.name + ".tmp")


def write_rng(ckpt_dir: Path, rank: int) -> None:
    """This process's RNG state, into the checkpoint's temporary folder."""
    (tmp_path(ckpt_dir) / f"rng_{rank}.json").write_text(json.dumps(rng_state()))


def finalize_checkpoint(ckpt_dir: Path) -> Path:
    """Rename the completed temporary folder to ``ckpt_dir`` (replacing an older one of the same name)."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    os.replace(tmp_path(ckpt_dir), ckpt_dir)
    return ckpt_dir


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def set_aside_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Move the checkpoints of a run past ``step`` to ``checkpoints/abandoned/`` (replacing a folder of the same name
    there), where a run resumed from an older checkpoint starts another trajectory: they no longer count as its
    latest, nor get pruned in place of its own. Returns their new paths."""
    abandoned = Path(run_dir) / "checkpoints" / "abandoned"
    moved = []
    for later in [p for p in list_checkpoints(run_dir) if int(STEP_DIR.match(p.name).group(1)) > step]:
        abandoned.mkdir(exist_ok=True)
        shutil.rmtree(abandoned / later.name, ignore_errors=True)
        moved.append(later.rename(abandoned / later.name))
    return moved


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``latest`` -> newest checkpoint of the run (an error without one); ``auto`` -> the same, or None (a fresh run)
    while there is none; a path -> that checkpoint; no ``resume`` -> None."""
    if not resume:
        return None
    if not isinstance(resume, str):  # resume=true reads as a YAML boolean
        raise ValueError(f"resume={resume!r}: expected latest, auto or the path of a checkpoint folder")
    if resume in ("latest", "auto"):
        found = list_checkpoints(run_dir)
        if not found and resume == "latest":  # as pin, neco and counting: a misspelt run_dir would silently start anew
            raise FileNotFoundError(
                f"resume=latest: no checkpoint under {Path(run_dir) / 'checkpoints'} (leave resume out to start a new "
                "run)"
            )
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume={resume!r}: {path} is not a checkpoint directory (no state.json)")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or the latest checkpoint when it is a run folder (``<run>/checkpoints/step_*``), as
    neco-eval and sharelock-eval take a run folder."""
    path = Path(path)
    if path.is_dir() and not (path / "state.json").is_file() and (path / "checkpoints").is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"run folder {path} holds no checkpoint under {path / 'checkpoints'}")
        return found[-1]
    return path


def load_checkpoint(path: Path) -> dict:
    """Everything a checkpoint holds, as tensors / plain values."""
    path = Path(path)
    out = {
        "student": load_safetensors(path / "student.safetensors"),
        "teacher": load_safetensors(path / "teacher.safetensors"),
        "loss": load_safetensors(path / "loss.safetensors"),
        "optimizer": optimizer_from_flat(
            load_safetensors(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
        ),
        "state": json.loads((path / "state.json").read_text()),
    }
    return out


def is_milestone(step: int, steps_per_epoch: int, every_epochs: int | None) -> bool:
    """Whether ``step`` ends a 0-based epoch e with e % every_epochs == 0: the reference's ``saveckp_freq`` rule,
    which keeps ``checkpoint{e:04}.pth`` after epochs 1, 21, 41, ... for every_epochs = 20."""
    if not every_epochs or steps_per_epoch <= 0 or step <= 0 or step % steps_per_epoch:
        return False
    return (step // steps_per_epoch - 1) % every_epochs == 0


def prune_checkpoints(
    run_dir: Path, keep: int | None, *, keep_every_epochs: int | None = None, steps_per_epoch: int = 0
) -> None:
    """Delete all but the ``keep`` newest checkpoints (None keeps all); with ``keep_every_epochs`` the end-of-epoch
    milestones of :func:`is_milestone` are kept as well.

    Whether a checkpoint is a milestone is decided by what it recorded when it was written (``state.json``:
    ``steps_per_epoch`` and the config's ``keep_every_epochs``; the arguments are the fallback for checkpoints that
    lack them), so a resume with another process count (another epoch length) or with ``keep_every_epochs=null``
    never deletes milestones kept before."""
    for old in list_checkpoints(run_dir)[:-keep] if keep and keep > 0 else []:
        step = int(STEP_DIR.match(old.name).group(1))
        try:
            state = json.loads((old / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        every = (state.get("config") or {}).get("keep_every_epochs", keep_every_epochs)
        if not is_milestone(step, state.get("steps_per_epoch", steps_per_epoch), every):
            shutil.rmtree(old, ignore_errors=True)
