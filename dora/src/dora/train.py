"""``dora-train``: DoRA pretraining on one or many long videos (accelerate; CPU, one or many GPUs, many nodes).

``method: dino`` trains the DINO baseline on the same frames instead: multi-crop self-distillation without tracking.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dora.augment import build_augmentation
from dora.checkpoint import (
    finalize_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    set_aside_checkpoints,
    set_rng_state,
    write_rng,
)
from dora.config import get_key, load_config, make_dir, run_cli, save_config
from dora.data import ClipBatchSampler, VideoClipDataset, collate_views
from dora.losses import DINOLoss, DoRALoss
from dora.models import DoRANetwork, build_network, check_shapes
from dora.schedules import cosine_schedule
from dora.tracking import choose_heads, track_and_mask

logger = logging.getLogger("dora")


def setup_logging(run_dir: Path | None, main_process: bool) -> None:
    """Log to stdout and ``<run_dir>/log.txt`` on the main process, warnings only elsewhere."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dora", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and main_process:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        h._dora = True
        root.addHandler(h)
    root.setLevel(logging.INFO if main_process else logging.WARNING)


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Weight decay except on biases and 1-D parameters (norms), as DINO's ``get_params_groups``.

    The head's weight-norm ``last_layer.weight_g`` is (out_dim, 1), so it is decayed, as in the reference.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """Scale each parameter's gradient separately to norm <= ``clip`` (the reference rule, without a host sync per
    parameter); returns the norms before clipping (one per parameter with a gradient)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = clip / (norms + 1e-6)
    # scale only where coef < 1 (a factor of exactly 1 leaves a gradient unchanged); a NaN coefficient (a NaN in the
    # gradient) leaves it as is, as the reference's `if coef < 1` does, instead of spreading NaN over the tensor
    coefs = torch.where(coefs < 1, coefs, torch.ones_like(coefs))
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


def cancel_last_layer_gradients(model: torch.nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Drop the gradients of the head's last layer during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def ema_update(student: torch.nn.Module, teacher: torch.nn.Module, momentum: float) -> None:
    """teacher <- m teacher + (1 - m) student, parameter by parameter."""
    for ps, pt in zip(student.parameters(), teacher.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


def resolve_videos(cfg: dict, run_dir: Path, main_process: bool) -> list[str]:
    """Video paths of the config; ``synthetic`` writes a generated walking video into the run folder."""
    from dora.synthetic import write_walking_video

    videos = []
    for v in cfg["data"]["videos"]:
        if v == "synthetic":
            path = run_dir / "synthetic_walk.mp4"
            if main_process and not path.exists():
                write_walking_video(path, num_frames=240, size=64, seed=cfg["seed"])
            videos.append(str(path))
        else:
            videos.append(str(v))
    return videos


def dora_step(
    student,
    teacher: DoRANetwork,
    loss_fn: DoRALoss,
    glob: torch.Tensor,
    locals_: list[torch.Tensor],
    epoch: int,
    heads: list[int],
    cfg: dict,
    autocast,
):
    """One forward pass: teacher + tracking on the global view, student on masked views and local crops.

    glob (B, T, 3, S, S), locals_ L x (B, T, 3, s, s). Returns (loss, masked views (K, B, T, 3, S, S)).
    """
    tr = cfg["tracking"]
    patch = teacher.backbone.patch_embed.patch_size[0]
    with torch.no_grad(), autocast():
        t_out, tokens, attn, query, key = teacher.forward_teacher(glob)
    masked = track_and_mask(
        attn.float(), query.float(), key.float(), tokens.float(), glob, patch, heads, tr["sk_epsilon"], tr["sk_iters"]
    )
    T = glob.shape[1]
    local = torch.stack(locals_).permute(2, 0, 1, 3, 4, 5)  # (T, L, B, 3, s, s)
    with autocast():
        s_masked, s_local = student(masked.transpose(1, 2), local)  # (K, T, B, D), (T, L, B, D)
    loss = loss_fn(s_local.float().reshape(T, -1, s_local.shape[-1]), s_masked.float(), t_out.float(), epoch)
    return loss, masked


def dino_step(
    student, teacher, loss_fn: DINOLoss, glob: torch.Tensor, locals_: list[torch.Tensor], epoch: int, autocast
):
    """One forward pass of the DINO baseline: teacher on the G global views, student on all views, frames as images.

    glob (B, G, T, 3, S, S), locals_ L x (B, T, 3, s, s). Returns the loss.
    """
    views = glob.transpose(0, 1)  # (G, B, T, 3, S, S)
    with torch.no_grad(), autocast():
        t_out = teacher(views)  # (G, B, T, D)
    with autocast():
        s_out = student(views, torch.stack(locals_)) if locals_ else (student(views),)
    s_out = torch.cat([o.float() for o in s_out]).flatten(1, 2)  # (G + L, B*T, D)
    return loss_fn(s_out, t_out.float().flatten(1, 2), epoch)


def _logged_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` record; infinity for a line cut short by a crash (dropped as a later step)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` after ``step``, where a run restarts, so that no step appears twice."""
    if path.is_file():
        text = path.read_text()
        kept = [line + "\n" for line in text.splitlines() if _logged_step(line) <= step]
        if "".join(kept) != text:  # via a temporary file: a kill while it is written loses no record
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)


# (section, key, null allowed): counts that must be positive integers (0 would train on nothing or without limit)
POSITIVE_INTEGERS = (
    ("data", "batch_size_per_gpu", False),
    ("data", "num_frames", False),
    ("data", "step", False),
    ("optim", "epochs", False),
    ("optim", "steps_per_epoch", True),
    ("optim", "max_steps", True),
    ("", "keep_checkpoints", True),
    ("", "keep_every_epochs", True),
)


def build_loss(cfg: dict) -> DoRALoss | DINOLoss:
    """The loss of ``cfg["method"]`` (``dora`` or ``dino``) from the ``loss``, ``augment`` and ``optim`` sections."""
    lcfg, a = cfg["loss"], cfg["augment"]
    temps = (lcfg["warmup_teacher_temp"], lcfg["teacher_temp"], lcfg["warmup_teacher_temp_epochs"])
    rest = (cfg["optim"]["epochs"], lcfg["student_temp"], lcfg["center_momentum"])
    if cfg.get("method", "dora") == "dino":
        return DINOLoss(cfg["model"]["out_dim"], a["num_global_crops"], *temps, *rest)
    return DoRALoss(cfg["model"]["out_dim"], a["num_local_crops"], *temps, *rest, lcfg["loss_variant"])


# settings a resumed run must keep (method aside, checked first): what the weights mean (drop_path aside), the clips and
# crops they are trained on, the objective, and the seed of the remaining steps' data order; its global batch (not the
# per-GPU one: another number of GPUs with the same global batch keeps the data order) is checked from state.json
RESUME_FIXED = (
    "seed", "model.arch", "model.out_dim", "model.head_hidden_dim", "model.head_bottleneck_dim",
    "model.norm_last_layer", "model.overrides", "data.num_frames", "data.step",
    "augment.global_size", "augment.local_size", "augment.num_global_crops", "augment.num_local_crops",
    "tracking.num_objects", "loss.loss_variant",
)  # fmt: skip
_ABSENT = object()


def check_resume_options(
    ckpt: Path, saved: dict, cfg: dict, global_batch: int | None = None, saved_global_batch: int | None = None
) -> None:
    """ValueError listing the ``RESUME_FIXED`` keys in which ``cfg`` differs from ``saved`` (the checkpoint's config;
    keys it lacks are not checked), and another global batch than the checkpoint's (when it recorded one): before,
    another seed, crop count or loss variant resumed silently."""
    diffs = [
        f"{key}={get_key(cfg, key, _ABSENT)!r} (checkpoint: {get_key(saved, key, _ABSENT)!r})"
        for key in RESUME_FIXED
        if get_key(saved, key, _ABSENT) is not _ABSENT and get_key(cfg, key, _ABSENT) != get_key(saved, key, _ABSENT)
    ]
    if saved_global_batch is not None and global_batch != saved_global_batch:
        diffs.append(
            f"global batch {global_batch} = data.batch_size_per_gpu x processes (checkpoint: {saved_global_batch})"
        )
    if diffs:
        raise ValueError(
            f"resume: {ckpt} was trained with other settings: {'; '.join(diffs)}; resume it with the same overrides "
            f"(its state.json config, or the run's config.yaml: --config {ckpt.parent.parent / 'config.yaml'})"
        )


def main(argv: list[str] | None = None) -> dict:
    """Train DoRA (or the DINO baseline); returns a summary dict (steps, last loss, run folder, last checkpoint)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = load_config(argv if argv is not None else sys.argv[1:])
    cfg.setdefault("method", "dora")  # configs written before the DINO baseline existed
    for section, key, optional in POSITIVE_INTEGERS:
        value, dotted = (cfg[section] if section else cfg).get(key), f"{section}.{key}".lstrip(".")
        if not (value is None and optional) and (type(value) is not int or value < 1):
            raise ValueError(f"{dotted}={value!r}: expected a positive integer" + (", or null" if optional else ""))
    run_dir = Path(cfg["run_dir"] or Path("runs") / "dora" / cfg["name"])
    if not cfg["resume"] and list_checkpoints(run_dir):  # a fresh run would replace them one by one
        raise ValueError(
            f"{run_dir} already holds the checkpoints of a run: continue it with resume=latest, or start a new run "
            "with another name= or run_dir="
        )
    ckpt = resolve_resume(cfg["resume"], run_dir)  # before any video is written or decoded
    # without CUDA, processes started by torchrun / accelerate launch form one gloo job only with cpu=True (else each
    # runs alone as rank 0 and they overwrite each other's run folder): the shipped configs say cpu: false
    cpu = bool(cfg["cpu"]) or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=cfg["optim"]["mixed_precision"], cpu=cpu)
    main_process = accelerator.is_main_process
    if main_process:
        make_dir(run_dir, "run_dir")
        if cfg["data"]["cache_dir"]:
            make_dir(cfg["data"]["cache_dir"], "data.cache_dir")
    accelerator.wait_for_everyone()
    setup_logging(run_dir, main_process)
    set_seed(cfg["seed"] + accelerator.process_index)

    d, o = cfg["data"], cfg["optim"]
    videos = resolve_videos(cfg, run_dir, main_process)
    if d["cache_dir"]:
        from dora.video import build_frame_cache

        with accelerator.main_process_first():
            videos = [
                str(
                    build_frame_cache(
                        v, Path(d["cache_dir"]) / f"{Path(v).stem}-{d['decode_short_side']}p", d["decode_short_side"]
                    )
                )
                for v in videos
            ]
    accelerator.wait_for_everyone()
    dataset = VideoClipDataset(
        videos, d["num_frames"], d["step"], build_augmentation(cfg), d["decode_short_side"], d["seek_gap"]
    )
    sampler = ClipBatchSampler(
        len(dataset),
        d["batch_size_per_gpu"],
        cfg["seed"],
        d["window"],
        accelerator.process_index,
        accelerator.num_processes,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_views,
        num_workers=d["num_workers"],
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator(),  # keeps the global torch RNG (drop-path) untouched by the loader
        persistent_workers=d["num_workers"] > 0,  # workers keep their open readers across epochs
    )
    niter = min(len(sampler), o["steps_per_epoch"] or len(sampler))
    total_steps = o["epochs"] * niter
    max_steps = min(total_steps, o["max_steps"] or total_steps)

    student = build_network(cfg)
    teacher = build_network(cfg, teacher=True)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = build_loss(cfg)
    optimizer = torch.optim.AdamW(param_groups(student), lr=0.0)
    global_batch = d["batch_size_per_gpu"] * accelerator.num_processes
    lr_s = cosine_schedule(o["lr"] * global_batch / 256, o["min_lr"], o["epochs"], niter, o["warmup_epochs"])
    wd_s = cosine_schedule(o["weight_decay"], o["weight_decay_end"], o["epochs"], niter)
    mom_s = cosine_schedule(o["momentum_teacher"], 1.0, o["epochs"], niter)

    step = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        saved_method = state["state"].get("config", {}).get("method", "dora")
        if saved_method != cfg["method"]:
            raise ValueError(f"resume={ckpt} is a method={saved_method} run; this config has method={cfg['method']}")
        saved = state["state"]
        check_resume_options(ckpt, saved.get("config", {}), cfg, global_batch, saved.get("global_batch"))
        check_shapes(
            student,
            state["student"],
            f"{ckpt / 'student.safetensors'} does not fit the model of the config",
            "resume with the run's model.* settings",
        )
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["state"]["step"])
        if step > max_steps:
            raise ValueError(
                f"resume: {ckpt} is at step {step}, past this run's end at step {max_steps} (optim.max_steps="
                f"{o['max_steps']}, optim.epochs={o['epochs']}); raise them to train further"
            )
        scaler_state = state["state"].get("scaler")
        rng_file = ckpt / f"rng_{accelerator.process_index}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        logger.info("resumed from %s at step %d", ckpt, step)
    elif cfg["resume"]:
        logger.info("resume=auto: no checkpoint in %s yet; starting a new run", run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if main_process:  # after the resume: a failed one leaves the run's metrics.jsonl and config.yaml as they were
        trim_metrics(metrics_path, step)
        moved = set_aside_checkpoints(run_dir, step)
        if moved:
            logger.info("set aside %d checkpoints past step %d in %s", len(moved), step, moved[0].parent)
        save_config(cfg, run_dir / "config.yaml")
    student, optimizer = accelerator.prepare(student, optimizer)
    if ckpt is None:
        # each process built its networks under its own seed; DDP has just broadcast rank 0's student, so the
        # teacher copies it again to start identical on every process
        teacher.load_state_dict(accelerator.unwrap_model(student).state_dict())
    if ckpt is not None and scaler_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    teacher.to(accelerator.device)
    loss_fn.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(student)
    num_heads = unwrapped.backbone.blocks[-1].attn.num_heads

    logger.info(
        "%s: %d videos, %d clips, %d steps/epoch, %d epochs, global batch %d, %d processes on %s",
        cfg["method"],
        len(videos),
        len(dataset),
        niter,
        o["epochs"],
        global_batch,
        accelerator.num_processes,
        accelerator.device,
    )
    last_ckpt = ckpt
    last_loss = None  # stays None when the run is already at its end (a resume of a finished run)

    def checkpoint(at_step: int) -> Path:
        ckpt_dir = run_dir / "checkpoints" / f"step_{at_step:06d}"
        accelerator.wait_for_everyone()
        if main_process:
            save_checkpoint(
                ckpt_dir,
                unwrapped,
                teacher,
                optimizer,
                loss_fn,
                {"step": at_step, "epoch": at_step // niter, "steps_per_epoch": niter, "global_batch": global_batch},
                cfg,
                {"scaler": accelerator.scaler.state_dict()} if accelerator.scaler is not None else None,
            )
        accelerator.wait_for_everyone()
        write_rng(ckpt_dir, accelerator.process_index)
        accelerator.wait_for_everyone()
        if main_process:
            finalize_checkpoint(ckpt_dir)
            prune_checkpoints(
                run_dir, cfg["keep_checkpoints"], keep_every_epochs=cfg.get("keep_every_epochs"), steps_per_epoch=niter
            )
        accelerator.wait_for_everyone()
        return ckpt_dir

    bar = tqdm(total=max_steps, initial=step, disable=not main_process, desc=f"{cfg['method']}-train", unit="it")
    while step < max_steps:
        epoch, start = divmod(step, niter)
        sampler.set_epoch(epoch, start)
        tic = time.perf_counter()
        for glob, locals_ in loader:
            it = step
            glob = glob.to(accelerator.device, non_blocking=True)
            locals_ = [x.to(accelerator.device, non_blocking=True) for x in locals_]
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(lr_s[it])
                if i == 0:
                    group["weight_decay"] = float(wd_s[it])
            if cfg["method"] == "dino":
                loss = dino_step(student, teacher, loss_fn, glob, locals_, epoch, accelerator.autocast)
            else:
                rng = random.Random(cfg["seed"] * 1_000_003 + it)
                heads = choose_heads(num_heads, cfg["tracking"]["num_objects"], rng)
                loss, _ = dora_step(student, teacher, loss_fn, glob, locals_, epoch, heads, cfg, accelerator.autocast)
            all_losses = accelerator.gather(loss.detach().reshape(1))
            if not torch.isfinite(all_losses).all():
                bar.close()  # the command's one-line error starts on a line of its own
                raise FloatingPointError(
                    f"non-finite loss {all_losses.tolist()} at step {it}; last good checkpoint: {last_ckpt or 'none'}"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if o["clip_grad"]:
                accelerator.unscale_gradients(optimizer)
                clip_gradients(unwrapped, o["clip_grad"])
            cancel_last_layer_gradients(unwrapped, epoch, o["freeze_last_layer"])
            optimizer.step()
            ema_update(unwrapped, teacher, float(mom_s[it]))
            step += 1
            last_loss = all_losses.mean().item()
            clips_s = global_batch / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", clips_s=f"{clips_s:.2f}")
            if main_process and (step % cfg["log_every"] == 0 or step == max_steps):
                rec = {
                    "step": step,
                    "epoch": epoch,
                    "loss": last_loss,
                    "lr": float(lr_s[it]),
                    "wd": float(wd_s[it]),
                    "momentum": float(mom_s[it]),
                    "clips_per_s": clips_s,
                }
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            end_of_epoch = step % niter == 0
            if step % cfg["checkpoint_every"] == 0 or end_of_epoch or step == max_steps:
                last_ckpt = checkpoint(step)
            if end_of_epoch or step >= max_steps:
                break
    bar.close()
    summary = {"steps": step, "loss": last_loss, "run_dir": str(run_dir), "checkpoint": str(last_ckpt)}
    if main_process:
        logger.info("done: %s", summary)
    accelerator.end_training()
    return summary


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "dora-train", FloatingPointError)


if __name__ == "__main__":
    cli()
