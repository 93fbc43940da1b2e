"""Validation inside pin-train: every `train.val_every_epochs` epochs (10, the reference's Lightning setting).

On the held-out synthetic compositions (the val object pool on `data.val_backgrounds`, `data.val_size` images) it
reports the training loss at the current epoch's phase (a token mean over the whole set; the same images every time)
and the mIoU of generated boxes: the same queries and numbers as `pin-eval eval.datasets=[synthetic]`; the same for
the zero-shot pool of held-out classes when there is one. The work is
split over the processes; RNG states are left untouched, so a run with validation follows the same training trajectory
as one without.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .boxes import GridCodec
from .eval import evaluate_queries, summarise
from .eval_data import HELD_OUT_EPOCH, synthetic_queries
from .methods import Method
from .pipeline import dataset_from_cfg, pools_from_cfg, summed_training_loss
from .runlog import record_step
from .synthetic import collate
from .vlm import FrozenVLM


class SyntheticValidation:
    """The validation sets of a training run; `run(...)` evaluates and appends a line to `<run>/validation.jsonl`.

    Two sets, as the reference validates on both: the val object pool (keys `val_loss`, `miou`, ...) and, when
    `data.held_out` names classes, the "zero_shot" pool of those never-trained classes (the same keys prefixed
    `zero_shot_`; `pin-eval eval.datasets=[synthetic_zero_shot]`)."""

    def __init__(self, cfg: dict, run_dir: Path) -> None:
        size = cfg["data"].get("val_size", 0)
        if not size:
            raise ValueError(
                f"train.val_every_epochs={cfg['train']['val_every_epochs']} needs data.val_size > 0 held-out "
                "compositions; set train.val_every_epochs=null to train without validation"
            )
        _, val_pool, zero_shot_pool = pools_from_cfg(cfg)
        if not len(val_pool):
            raise ValueError(
                "the validation object pool is empty; raise data.val_size or set train.val_every_epochs=null"
            )
        self.cfg, self.path = cfg, run_dir / "validation.jsonl"
        pools = [("", val_pool)]
        if len(zero_shot_pool):
            pools.append(("zero_shot_", zero_shot_pool))
        self.sets = []
        for prefix, pool in pools:
            dataset = dataset_from_cfg(cfg, pool, "val")
            queries = synthetic_queries(dataset, size)
            dataset.sample_epoch = HELD_OUT_EPOCH  # the same images at every validation; the phase follows training
            self.sets.append((prefix, dataset, queries))
        self.queries = self.sets[0][2]  # the val pool's queries, as pin-eval's `synthetic`

    def run(self, vlm: FrozenVLM, codec: GridCodec, method: Method, accelerator: Accelerator, epoch: int, step: int):
        """Validation loss and mIoU of every set after `epoch`; every process returns the same dict."""
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        method.train(False)
        row = {"epoch": epoch, "step": step}
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for prefix, dataset, queries in self.sets:
                scores = self._evaluate(dataset, queries, vlm, codec, accelerator, epoch)
                row.update({prefix + key: value for key, value in scores.items()})
        method.train(True)
        if accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def logged(self, step: int) -> bool:
        """Whether `validation.jsonl` holds the (complete) record of the validation at `step`."""
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return any(record_step(line) == step for line in lines)

    def _evaluate(self, dataset, queries, vlm, codec, accelerator: Accelerator, epoch: int) -> dict:
        """{"val_loss": token-mean training loss, then `summarise`'s mIoU figures} of one set."""
        e = self.cfg["eval"]
        dataset.set_epoch(epoch)
        indices = list(range(len(dataset)))
        batch = self.cfg["train"]["batch_size"]
        with accelerator.split_between_processes(indices) as mine:
            sums = torch.zeros(2, device=accelerator.device)  # token cross-entropy sum, supervised tokens
            for start in range(0, len(mine), batch):
                items = collate([dataset[i] for i in mine[start : start + batch]])
                with accelerator.autocast():
                    loss, tokens = summed_training_loss(vlm, codec, items, accelerator.device)
                sums += torch.stack([loss.float(), loss.new_tensor(float(tokens))])
        sums = accelerator.reduce(sums, "sum")
        # whole evaluation batches per process: the batch-weighted figures then match a single process
        size = e["batch_size"]
        batches = [queries[i : i + size] for i in range(0, len(queries), size)]
        with accelerator.split_between_processes(batches) as mine:
            mine = [q for b in mine for q in b]
            result = evaluate_queries(vlm, codec, mine, size, e["num_beams"], e["max_new_tokens"])
        result = {key: gather_object(result[key]) for key in ("preds", "gts", "texts", "batches")}
        return {"val_loss": (sums[0] / sums[1]).item(), **summarise(result, codec)}
