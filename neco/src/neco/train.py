"""``neco-train``: NeCo post-pretraining with accelerate (one code path for CPU, 1 GPU, many GPUs, many nodes).

neco-train                                   # paper recipe: configs/dinov2r_vits14.yaml on COCO train2017
neco-train --config tiny                     # CPU, synthetic data, seconds
neco-train data.root=/data/coco optim.batch_size=32 train.resume=latest
accelerate launch --multi_gpu --num_processes 8 -m neco.train --config dinov2r_vitb14
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from neco.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    scaler_state,
    set_aside_checkpoints,
)
from neco.config import get_key, load_config, run_cli
from neco.data import StepBatchSampler, build_train_dataset, collate_multicrop
from neco.losses import BatchGather, neco_loss
from neco.masks import check_loss_mask, token_masks
from neco.models import build_student_teacher, ema_update, freeze_blocks, param_groups
from neco.queue import PatchQueue
from neco.schedules import cosine_schedule
from neco.validation import build_validation_dataset, is_due, validate, validation_config

log = logging.getLogger("neco")


def setup_logging(run_dir: str | None, main_process: bool) -> None:
    """Log to stdout and ``<run_dir>/log.txt`` (main process); replaces handlers of earlier calls."""
    log.handlers.clear()
    log.setLevel(logging.INFO if main_process else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir and main_process:
        handlers.append(logging.FileHandler(os.path.join(run_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)


def run_directory(cfg: dict[str, Any]) -> str:
    """``train.run_dir``, or ``<output_dir>/<name>`` when it is empty."""
    return cfg["train"]["run_dir"] or os.path.join(cfg["output_dir"], cfg["name"])


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's global and torch's (CPU and CUDA) RNGs with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the global state used by third-party code)
    torch.manual_seed(seed)


def build_schedules(cfg: dict[str, Any], iters_per_epoch: int) -> dict[str, np.ndarray]:
    """Per-step lr (backbone, head), weight decay and teacher momentum (spec section 5)."""
    o = cfg["optim"]
    epochs = o["epochs"]
    return {
        "lr_backbone": cosine_schedule(o["lr_backbone"], o["final_lr"], epochs, iters_per_epoch),
        "lr_head": cosine_schedule(o["lr_head"], o["final_lr"], epochs, iters_per_epoch),
        "weight_decay": cosine_schedule(o["weight_decay"], o["weight_decay_end"], epochs, iters_per_epoch),
        "momentum": cosine_schedule(o["momentum_teacher"], o["momentum_teacher_end"], epochs, iters_per_epoch),
    }


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: dict[str, np.ndarray], step: int) -> None:
    """Set the step's learning rates (groups 0-1 backbone, 2-3 head) and weight decay (decayed groups only)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(schedules["lr_backbone" if i < 2 else "lr_head"][step])
        if group.get("decay", i % 2 == 0):
            group["weight_decay"] = float(schedules["weight_decay"][step])


def forward_net(net: torch.nn.Module, crops: list[torch.Tensor], attention: bool) -> tuple[list, list | None]:
    """``net``'s head outputs on ``crops`` in float32 and, with ``attention``, each crop's CLS attention (else None)."""
    outputs, attentions = net(crops, attention=True) if attention else (net(crops), None)
    return [o.float() for o in outputs], attentions


_ABSENT = object()

RESUME_FIXED = (  # (dotted key, default for a checkpoint without it; _ABSENT: unchecked): what a resume keeps
    ("loss.use_teacher", True),
    ("optim.trainable_blocks", None),
    ("loss.mask", "all"),
    ("seed", _ABSENT),  # the data order and crops of the remaining steps
    ("model.name", _ABSENT),  # the backbone and head the weights belong to (drop_path aside)
    ("model.patch_size", _ABSENT),
    ("model.drop_registers", _ABSENT),
    ("model.head_hidden_dim", _ABSENT),
    ("model.head_out_dim", _ABSENT),
    ("model.head_layers", _ABSENT),
    ("model.overrides", _ABSENT),
    ("data.global_size", _ABSENT),  # the crops the weights and the queue were trained on
    ("data.local_size", _ABSENT),
    ("data.num_global", _ABSENT),
    ("data.num_local", _ABSENT),
    ("loss.network", _ABSENT),  # the objective
    ("loss.similarity", _ABSENT),
    ("loss.use_queue", _ABSENT),
    ("loss.queue_length", _ABSENT),
    ("optim.batch_size", _ABSENT),
)


def _logged_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` record; infinity for a line cut short by a crash (dropped as a later step)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def trim_metrics(path: str, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` that a run restarting at ``step`` writes again, so that no step appears
    twice: those after ``step``, and all of them at step 0 (its step-0 validation runs again)."""
    if os.path.isfile(path):
        with open(path) as f:
            text = f.read()
        kept = [line + "\n" for line in text.splitlines() if step and _logged_step(line) <= step]
        if "".join(kept) != text:  # via a temporary file: a kill while it is written loses no record
            with open(path + ".tmp", "w") as f:
                f.write("".join(kept))
            os.replace(path + ".tmp", path)


def validated(run_dir: str, step: int) -> bool:
    """Whether ``metrics.jsonl`` holds the validation record of ``step`` (a complete line)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        lines = f.read().splitlines()
    return any(_logged_step(line) == step and "val_images" in json.loads(line) for line in lines)


def check_resume_options(path: str, cfg: dict[str, Any]) -> None:
    """A resumed run must keep the settings of its checkpoint (``RESUME_FIXED``): another ``loss.use_teacher``
    would restart the EMA from a teacher that never moved (or stop it), another ``optim.trainable_blocks`` changes
    the optimiser's parameter groups, another ``loss.mask``, crop count, sorting network or seed the objective, the
    queue's contents or the data order; another model size would not load. ValueError naming each key and both
    values."""
    with open(os.path.join(path, "meta.json")) as f:
        saved = json.load(f)["config"]
    diffs = []
    for key, default in RESUME_FIXED:
        was, now = get_key(saved, key, default), get_key(cfg, key, default)
        if was is not _ABSENT and was != now:
            diffs.append(f"{key}={was!r}, this run has {now!r}")
    if diffs:
        raise ValueError(
            f"train.resume: {path} was trained with {'; '.join(diffs)}; resume with the checkpoint's values (its "
            "meta.json config) or start a new run"
        )


def check_counts(cfg: dict[str, Any]) -> None:
    """Counts that must be positive integers (``optim.max_steps`` may be null; ``loss.queue_length`` only with the
    queue on): a ValueError naming the key before anything is written (0 steps used to mean "no limit", a batch of 0
    a ZeroDivisionError)."""
    keys = ["optim.batch_size", "optim.epochs", "train.checkpoint_every", "train.log_every"]
    keys += ["loss.queue_length"] if cfg["loss"]["use_queue"] else []
    keys += ["optim.max_steps"] if cfg["optim"]["max_steps"] is not None else []
    for key in keys:
        section, name = key.split(".")
        value = cfg[section][name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: expected a positive integer")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train NeCo; returns {"run_dir", "step", "losses", "checkpoint"}."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    check_counts(cfg)
    tcfg, ocfg, lcfg = cfg["train"], cfg["optim"], cfg["loss"]
    if tcfg["tensorboard"] and not is_tensorboard_available():  # accelerate would only warn and log nothing
        raise ValueError('train.tensorboard=true needs TensorBoard: pip install "funai-neco[tensorboard]"')
    mask_mode = check_loss_mask(lcfg.get("mask", "all"))  # fg / bg: the foreground-background ablation
    masked = mask_mode != "all"
    grid = cfg["data"]["global_size"] // cfg["model"]["patch_size"]
    if masked and grid < 4:
        raise ValueError(
            f"loss.mask={mask_mode} needs global crops of at least 4 x 4 tokens: data.global_size="
            f"{cfg['data']['global_size']} // model.patch_size={cfg['model']['patch_size']} = {grid}"
        )
    use_cpu = bool(tcfg["cpu"]) or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision="no" if use_cpu else tcfg["mixed_precision"],
        log_with="tensorboard" if tcfg["tensorboard"] else None,
        project_dir=run_directory(cfg),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    run_dir = run_directory(cfg)
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    setup_logging(run_dir, accelerator.is_main_process)

    seed_everything(cfg["seed"])
    dataset = build_train_dataset(cfg["data"], cfg["seed"])  # fails at once when the data is missing
    vcfg = validation_config(cfg)  # in-training VOC k-means validation; None while val.root is null
    val_data = build_validation_dataset(vcfg, cfg["model"]["patch_size"]) if vcfg else None
    if use_cpu and tcfg["mixed_precision"] != "no":
        log.warning("train.mixed_precision=%s needs a GPU: this CPU run trains in float32", tcfg["mixed_precision"])
    if not tcfg["resume"] and list_checkpoints(run_dir):  # a fresh start would overwrite, mix with and prune them
        raise ValueError(
            f"{run_dir} already holds checkpoints (latest {list_checkpoints(run_dir)[-1]}): continue that run with "
            "train.resume=latest, or start a new one elsewhere (name=... or train.run_dir=...)"
        )
    global_batch = int(ocfg["batch_size"])
    sampler_probe = StepBatchSampler(len(dataset), global_batch, cfg["seed"], rank, world)
    iters_per_epoch = sampler_probe.iters_per_epoch
    total_steps = int(ocfg["epochs"]) * iters_per_epoch
    end_step = min(total_steps, ocfg["max_steps"] or total_steps)
    schedules = build_schedules(cfg, iters_per_epoch)

    student, teacher = build_student_teacher(cfg["model"])
    blocks = freeze_blocks(student.backbone, ocfg.get("trainable_blocks"))
    use_teacher = bool(lcfg.get("use_teacher", True))  # false: the "no teacher" ablation, no EMA
    queue = PatchQueue(cfg["data"]["num_global"], lcfg["queue_length"], cfg["model"]["head_out_dim"])
    optimizer = torch.optim.AdamW(param_groups(student, ocfg["lr_backbone"], ocfg["lr_head"], ocfg["weight_decay"]))
    modules = {"student": student, "teacher": teacher, "queue": queue}

    start_step, history = 0, []
    path = resolve_resume(tcfg["resume"], run_dir)  # None: a fresh run (no train.resume, or auto before a checkpoint)
    if path is not None:
        check_resume_options(path, cfg)
        meta = load_checkpoint(path, modules, optimizer, rank)
        start_step, history = meta["step"], meta.get("losses", [])
        if end_step < start_step:
            raise ValueError(
                f"train.resume: {path} is at step {start_step}, past this run's end at step {end_step} "
                f"(optim.max_steps={ocfg['max_steps']}, optim.epochs={ocfg['epochs']}); raise them to train further"
            )
        if accelerator.scaler is not None and meta.get("scaler"):
            accelerator.scaler.load_state_dict(meta["scaler"])
        log.info("resumed from %s at step %d", path, start_step)
    else:
        if tcfg["resume"]:
            log.info("train.resume=auto: no checkpoint in %s yet; starting a new run", run_dir)
        seed_everything(cfg["seed"])  # model init consumed RNG; restart the stream identically on every process

    if accelerator.is_main_process:  # after the resume checks: a refused or failed run leaves its files as they were
        trim_metrics(os.path.join(run_dir, "metrics.jsonl"), start_step)
        moved = set_aside_checkpoints(run_dir, start_step)
        if moved:
            log.info("set aside %d checkpoints past step %d in %s", len(moved), start_step, os.path.dirname(moved[0]))
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    accelerator.wait_for_everyone()  # the others list the run's checkpoints (last_checkpoint) once they are set aside
    # every process decides alike, before the barrier below: a process reading metrics.jsonl after the main one has
    # appended the record would skip the validation's barrier and hang the run
    validate_first = bool(vcfg) and is_due(vcfg, start_step, iters_per_epoch) and not validated(run_dir, start_step)
    accelerator.wait_for_everyone()
    if tcfg["tensorboard"]:  # a resume hides the earlier files' events past its step (they are logged at step + 1 on;
        # at step 0 the step-0 validation runs again, and a run restarted before its first checkpoint logs from 1)
        purge = {"purge_step": start_step + 1 if start_step else 0}
        accelerator.init_trackers(cfg["name"], init_kwargs={"tensorboard": purge})

    student, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device)
    queue.to(accelerator.device)
    loader = DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(len(dataset), global_batch, cfg["seed"], rank, world, start_step),
        collate_fn=collate_multicrop,
        num_workers=cfg["data"]["num_workers"],
        pin_memory=not use_cpu,
        generator=torch.Generator().manual_seed(cfg["seed"]),  # keeps the global RNG stream untouched
    )
    gather = BatchGather(
        fn=accelerator.gather if world > 1 else (lambda t: t), offset=rank * (global_batch // world), total=global_batch
    )
    num_global = cfg["data"]["num_global"]
    sizes = dataset.sizes
    last_checkpoint = list_checkpoints(run_dir)[-1] if list_checkpoints(run_dir) else None
    losses = list(history)
    log.info(
        "training %s: %d processes, global batch %d, steps %d..%d of %d (%d per epoch), blocks %s%s%s, run dir %s",
        cfg["name"],
        world,
        global_batch,
        start_step,
        end_step,
        total_steps,
        iters_per_epoch,
        blocks,
        "" if use_teacher else ", no teacher",
        f", loss mask {mask_mode}" if masked else "",
        run_dir,
    )

    def checkpoint(step: int) -> str:
        meta = {"config": cfg, "losses": losses, "iters_per_epoch": iters_per_epoch}
        meta["scaler"] = scaler_state(accelerator.scaler)
        mods = {"student": accelerator.unwrap_model(student), "teacher": teacher, "queue": queue}
        return save_checkpoint(
            run_dir, step, mods, optimizer, meta, rank, accelerator.wait_for_everyone, tcfg["keep_checkpoints"]
        )

    def validation(done: int) -> None:
        """k-means mIoU on VOC val (main process; the others wait), appended to metrics.jsonl."""
        if accelerator.is_main_process:
            net = teacher if vcfg["weights"] == "teacher" else accelerator.unwrap_model(student)
            record = {"step": done, "epoch": done / iters_per_epoch}
            patch = cfg["model"]["patch_size"]
            record.update(validate(net.backbone, val_data, vcfg, patch, accelerator.device, accelerator.autocast))
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if tcfg["tensorboard"]:
                accelerator.log(record, step=done)
            scores = ", ".join(f"K={k} {100 * record[f'val_miou_k{k}']:.2f}" for k in vcfg["ks"])
            log.info("step %d val k-means mIoU %% (%s, %d images): %s", done, vcfg["weights"], len(val_data), scores)
        accelerator.wait_for_everyone()

    if tcfg["save_initial"] and start_step == 0:
        last_checkpoint = checkpoint(0)  # the pretrained starting point, for before/after evaluations
    if validate_first:
        validation(start_step)  # step 0, or a resume whose run was killed in the validation after its checkpoint
    bar = tqdm(total=end_step, initial=start_step, disable=not accelerator.is_main_process, desc="neco", unit="step")
    batches = iter(loader)
    tic = time.perf_counter()
    for step in range(start_step, end_step):
        crops, boxes = next(batches)
        crops = [c.to(accelerator.device, non_blocking=True) for c in crops]
        boxes = boxes.to(accelerator.device)
        apply_schedules(optimizer, schedules, step)
        if use_teacher:
            with torch.no_grad(), accelerator.autocast():
                teacher_out, attention = forward_net(teacher, crops[:num_global], masked)
        student_out, own_attention = forward_net(student, crops, masked and not use_teacher)
        if not use_teacher:  # the student's own global-crop outputs (and attention) give the stop-gradient targets
            teacher_out, attention = [s.detach() for s in student_out[:num_global]], own_attention
        masks = token_masks(attention[:num_global], mask_mode) if masked else None
        references = None
        if lcfg["use_queue"]:
            for c in range(num_global):
                mask = None if masks is None else gather.fn(masks[c])
                queue.push_random(c, gather.fn(teacher_out[c]), lcfg["queue_per_image"], mask)
            references = queue.banks()
        loss = neco_loss(
            teacher_out,
            student_out,
            boxes,
            sizes,
            cfg["model"]["patch_size"],
            references=references,
            steepness=lcfg["student_steepness"],
            network=lcfg["network"],
            teacher_steepness=lcfg["teacher_steepness"],
            similarity=lcfg["similarity"],
            gather=gather,
            checkpoint_sort=lcfg["checkpoint_sort"],
            masks=masks,
        )
        loss_value = float(accelerator.reduce(loss.detach(), reduction="mean"))
        if not math.isfinite(loss_value):
            bar.close()
            raise FloatingPointError(
                f"non-finite loss {loss_value} at step {step}; stopping. Last good checkpoint: "
                f"{last_checkpoint or 'none'} (resume with train.resume=latest after lowering the learning rate)"
            )
        if masked and loss_value == 0.0:  # as the reference: no update when the masks select nothing
            if accelerator.is_main_process:
                log.warning("step %d: loss.mask=%s selects no aligned location; update skipped", step + 1, mask_mode)
        else:
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if use_teacher:
                ema_update(teacher, accelerator.unwrap_model(student), float(schedules["momentum"][step]))
        losses.append(loss_value)
        done = step + 1
        images_per_s = global_batch * (done - start_step) / (time.perf_counter() - tic)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images_per_s:.1f}")
        bar.update(1)
        if done % tcfg["log_every"] == 0 or done == end_step:
            record = {
                "step": done,
                "loss": loss_value,
                "lr_backbone": float(schedules["lr_backbone"][step]),
                "weight_decay": float(schedules["weight_decay"][step]),
                "momentum": float(schedules["momentum"][step]),
                "images_per_s": images_per_s,
            }
            if accelerator.is_main_process:
                with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            if tcfg["tensorboard"]:
                accelerator.log(record, step=done)
            log.info("step %d loss %.5f img/s %.1f", done, loss_value, images_per_s)
        if done % tcfg["checkpoint_every"] == 0 or done == end_step:
            last_checkpoint = checkpoint(done)
        if vcfg and is_due(vcfg, done, iters_per_epoch):  # after the checkpoint: a failing validation loses nothing
            started = time.perf_counter()
            validation(done)
            tic += time.perf_counter() - started  # img/s counts training time only
    bar.close()
    accelerator.end_training()  # closes the trackers and destroys the process group (gloo threads at exit can abort)
    log.info("finished at step %d; last checkpoint %s", end_step, last_checkpoint)
    return {"run_dir": run_dir, "step": end_step, "losses": losses, "checkpoint": last_checkpoint}


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "neco-train", FloatingPointError)


if __name__ == "__main__":
    cli()
