"""Checkpoints without pickle: trainable tensors and optimiser tensors in safetensors, the rest in JSON (including
the fp16 gradient scaler's scale and growth tracker).

Layout: <run>/checkpoints/step_0000123/{weights.safetensors, optimizer.safetensors, state.json, config.yaml};
written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from funai_common.weights import load_safetensors, load_state_dict

from .config import dump_config


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of the python, numpy and torch RNG states."""
    py = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the global state is what gets restored)
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore the python, numpy and torch RNG states saved by `rng_state` (CUDA ones only where CUDA is available)."""
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))  # noqa: NPY002
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split an optimiser state dict into JSON (param groups, scalar entries) and tensors."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def load_optimizer(optimizer: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors`: load the JSON part and the tensors back into `optimizer`."""
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def scaler_state(scaler) -> dict:
    """JSON state of a torch GradScaler (scale, growth tracker, factors); {} without one (no fp16)."""
    if scaler is None:
        return {}
    return {k: v.item() if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}


def load_scaler(scaler, state: dict) -> None:
    """Restore a GradScaler from `scaler_state` output; a checkpoint without one leaves the scaler as built."""
    if scaler is not None and state:
        scaler.load_state_dict(state)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/checkpoints/step_XXXXXXX``: the folder of the checkpoint at ``step``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, weights: dict, optimizer, state: dict, cfg: dict, scaler=None) -> Path:
    """Write checkpoints/step_XXXXXXX atomically; `state` is JSON-serialisable (epoch, step, ...); `scaler` the
    GradScaler of fp16 runs (or None)."""
    final = checkpoint_path(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "weights.safetensors"))
    rng_meta, rng_tensors = rng_state()
    opt_meta, opt_tensors = optimizer_tensors(optimizer) if optimizer is not None else ({}, {})
    save_file({**opt_tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
    clean_cfg = {k: v for k, v in cfg.items() if k != "_cli"}
    with open(tmp / "state.json", "w") as f:
        meta = {**state, "rng": rng_meta, "optimizer": opt_meta, "scaler": scaler_state(scaler), "config": clean_cfg}
        json.dump(meta, f)
    dump_config(cfg, tmp / "config.yaml")
    replace_dir(tmp, final)
    return final


def replace_dir(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``; an existing ``target`` is moved aside first and deleted only afterwards, so a
    crash leaves either folder complete (the old one as ``.old_<target name>``)."""
    old = target.with_name(f".old_{target.name}")  # hidden: never matched by step_* lookups
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def step_folders(checkpoints: Path) -> list[Path]:
    """The ``step_<N>`` folders of ``checkpoints`` by step number (by name, step_1000000 came before step_999999)."""
    found = [p for p in Path(checkpoints).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_checkpoint(run_dir: Path, which: str) -> Path | None:
    """`latest` -> newest step_* in run_dir/checkpoints (an error without one); `auto` -> the same, or None without
    one (a fresh start: requeued jobs pass the same command every time); otherwise a checkpoint folder path."""
    if which in ("latest", "auto"):
        ckpts = step_folders(Path(run_dir) / "checkpoints")
        if not ckpts and which == "latest":
            raise FileNotFoundError(
                f"--resume latest: no checkpoints in {Path(run_dir) / 'checkpoints'} (leave --resume out, or --resume "
                "auto, to start a new run)"
            )
        return ckpts[-1] if ckpts else None
    path = Path(which)
    if not (path / "weights.safetensors").is_file():
        raise FileNotFoundError(f"checkpoint {path} must be a folder holding weights.safetensors and state.json")
    return path


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
    if path.is_dir() and not (path / "weights.safetensors").is_file() and (path / "checkpoints").is_dir():
        found = step_folders(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"run folder {path} holds no checkpoint under {path / 'checkpoints'}")
        return found[-1]
    return path


REFERENCE_SUFFIXES = (".pt", ".pth", ".ckpt")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Trainable tensors of a checkpoint folder, of a bare .safetensors file, or of a reference `.pt` file such as
    the released `PINs/PIN_OF.pt` (read with `weights_only`, so no code runs; see `from_reference_weights`)."""
    path = Path(path)
    file = path / "weights.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no PIN weights at {file}; expected a checkpoint folder, a .safetensors file or a reference .pt file"
        )
    if file.suffix in REFERENCE_SUFFIXES:
        return from_reference_weights(load_state_dict(file, keys=()), file)  # garbage: a ValueError naming it
    return load_safetensors(file)


def from_reference_weights(state: dict, source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """This package's names for a QUVA-Lab/PIN checkpoint: PIN's {'mlp': psi state dict, 'pos_enc': S} (S is
    (1, N, d) for the sin-cos table, (N, d) for `embed_channel=learned`) -> {'mlp.<key>', 'pos_enc' (1, N, d)};
    VPT's {'prompt': (1, T, D)} -> {'prompts'}. psi is the same nn.Sequential, so the keys match as they are."""
    if "mlp" in state and "pos_enc" in state:
        out = {f"mlp.{k}": v for k, v in state["mlp"].items()}
        pos = state["pos_enc"]
        out["pos_enc"] = pos if pos.ndim == 3 else pos[None]
        return out
    if "prompt" in state:
        return {"prompts": state["prompt"]}
    raise KeyError(
        f"{source} holds {sorted(state)}: expected a reference PIN checkpoint ('mlp', 'pos_enc') or VPT ('prompt'); "
        "the reference's LoRA files (its swapped attention modules) are not supported"
    )


def load_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json content, optimizer/rng tensors) of a checkpoint folder."""
    with open(Path(path) / "state.json") as f:
        state = json.load(f)
    return state, load_safetensors(Path(path) / "optimizer.safetensors")
