"""In-training validation (spec section 7): k-means mIoU of the backbone's patch tokens on Pascal VOC val.

As the reference (``NeCo.validation_step`` / ``PredsmIoUKmeans``): the first ``batches`` x ``batch_size`` val images
at 448 px, masks at 100 x 100, K in {500, 300, 21}, one faiss k-means run per K (niter 50, nredo 5, seed 1), at the
end of every epoch (Lightning's ``check_val_every_n_epoch=1``, no sanity run at step 0), on the student backbone
(``self.model``). It reuses ``neco.evaluation.overclustering``, so the scores are those of ``neco-eval``'s
overclustering with one seed. Off while ``val.root`` is null.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from neco.evaluation import overclustering
from neco.models import patch_tokens

DEFAULTS: dict[str, Any] = {
    "root": None,
    "split": "val",
    "every_epochs": 1,
    "every_steps": None,
    "at_start": False,
    "weights": "student",
    "ks": [500, 300, 21],
    "input_size": 448,
    "mask_size": 100,
    "batch_size": 32,
    "batches": 20,
    "pca_dim": 50,
    "seed": 1,
    "niter": 50,
    "nredo": 5,
}


def validation_config(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The ``val`` section with defaults filled in, or None when validation is off (no ``val.root``).

    ValueError naming the key for a setting that cannot work (checked before training starts)."""
    given = cfg.get("val") or {}
    if not given.get("root"):
        return None
    v = {**DEFAULTS, **given}
    for key in ("every_epochs", "every_steps"):
        if v[key] is not None and (not _is_int(v[key]) or v[key] < 1):
            raise ValueError(f"val.{key} must be a positive integer or null, got {v[key]!r}")
    if v["every_epochs"] is None and v["every_steps"] is None and not v["at_start"]:
        raise ValueError("val.root is set but val.every_epochs and val.every_steps are null: validation never runs")
    if v["weights"] not in ("student", "teacher"):
        raise ValueError(f"val.weights must be 'student' or 'teacher', got {v['weights']!r}")
    if v["weights"] == "teacher" and not cfg["loss"].get("use_teacher", True):
        raise ValueError("val.weights=teacher but loss.use_teacher=false (the teacher never moves); use student")
    if not v["ks"] or any(not _is_int(k) or k < 2 for k in v["ks"]):
        raise ValueError(f"val.ks must be a list of integers >= 2, got {v['ks']!r}")
    for key in ("batch_size", "batches", "input_size", "mask_size", "pca_dim", "niter", "nredo"):
        if not _is_int(v[key]) or v[key] < 1:
            raise ValueError(f"val.{key} must be a positive integer, got {v[key]!r}")
    if not _is_int(v["seed"]) or v["seed"] < 0:
        raise ValueError(f"val.seed must be an integer >= 0, got {v['seed']!r}")
    return v


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_validation_dataset(v: dict[str, Any], patch_size: int) -> Any:
    """The first ``batches * batch_size`` images of VOC ``split`` (FileNotFoundError naming ``val.root``)."""
    from funai_common.datasets import VOCSegmentation

    try:
        data = VOCSegmentation(v["root"], v["split"])
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"val.root={v['root']!r}: Pascal VOC {v['split']} not found ({err}); point val.root at the VOC folder "
            "or set val.root=null to train without in-training validation"
        ) from None
    data = Subset(data, range(min(len(data), v["batches"] * v["batch_size"])))
    tokens = len(data) * (v["input_size"] // patch_size) ** 2
    if len(data) == 0 or max(v["ks"]) > tokens:
        raise ValueError(
            f"val.ks={v['ks']}: {len(data)} val images give {tokens} patch tokens at val.input_size={v['input_size']}, "
            "fewer than the largest K"
        )
    return data


def is_due(v: dict[str, Any], done: int, iters_per_epoch: int) -> bool:
    """Whether to validate after ``done`` steps (``done`` = 0: before the first step)."""
    if done == 0:
        return bool(v["at_start"])
    epochs, steps = v["every_epochs"], v["every_steps"]
    return bool((epochs and done % (epochs * iters_per_epoch) == 0) or (steps and done % steps == 0))


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the Python, NumPy and torch (CPU and ``device``) RNG states on exit: validation (its DataLoader draws a
    seed from the global torch generator) leaves the training stream untouched."""
    py, npy = random.getstate(), np.random.get_state()  # noqa: NPY002 (the global state training draws from)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)  # noqa: NPY002


def validate(
    backbone: torch.nn.Module,
    dataset: Any,
    v: dict[str, Any],
    patch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """k-means mIoU (in [0, 1]) for each K of ``v['ks']``: {"val_miou_k500": ..., "val_images", "val_seconds"}.

    The backbone is put in eval mode and back; the RNG streams are restored."""
    from funai_common.datasets import VOCSegmentation

    tic = time.perf_counter()
    was_training = backbone.training

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        with autocast():
            return patch_tokens(backbone, images)

    backbone.eval()
    try:
        with preserved_rng(device):
            res = overclustering(
                features,
                dataset,
                num_classes=VOCSegmentation.num_classes,
                patch_size=patch_size,
                ks=v["ks"],
                input_size=v["input_size"],
                mask_size=v["mask_size"],
                pca_dim=v["pca_dim"],
                seeds=[v["seed"]],
                niter=v["niter"],
                nredo=v["nredo"],
                ignore_index=255,
                batch_size=v["batch_size"],
                device=device,
                progress=False,
            )
    finally:
        backbone.train(was_training)
    record = {f"val_miou_k{k}": res[f"K={k}"]["miou"] for k in v["ks"]}
    record.update(val_images=len(dataset), val_seconds=time.perf_counter() - tic)
    return record
