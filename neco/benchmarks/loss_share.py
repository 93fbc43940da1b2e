"""Share of the NeCo loss (RoI-align + soft sorting + cross-entropy, forward and backward) in a training step.

Baseline measured in the same run: the student forward/backward on all crops plus the teacher forward on the
global crops of a ViT-S/14 with the 2048-2048-256 head at the paper's crop sizes (2 x 518 px, 4 x 98 px).
Each phase runs in a fresh subprocess so that its peak resident memory can be reported.

    python neco/benchmarks/loss_share.py                   # batch 1, CPU, 1 thread
    python neco/benchmarks/loss_share.py --batch 2 --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from queue import Empty


def _setup(batch: int, device: str, model_needed: bool):
    import torch

    from neco.crops import sample_crop_boxes
    from neco.models import build_student_teacher

    gen = torch.Generator().manual_seed(0)
    boxes = torch.stack([sample_crop_boxes(640, 480, generator=gen) for _ in range(batch)]).to(device)
    sizes = [518, 518, 98, 98, 98, 98]
    crops = [torch.randn(batch, 3, s, s, generator=gen).to(device) for s in sizes]
    nets = None
    if model_needed:
        cfg = {
            "name": "vit_small_patch14_reg4_dinov2",
            "pretrained": False,
            "checkpoint": None,
            "drop_registers": False,
            "patch_size": 14,
            "drop_path": 0.1,
            "head_hidden_dim": 2048,
            "head_out_dim": 256,
            "head_layers": 3,
            "overrides": {"img_size": 518},
        }
        nets = [n.to(device) for n in build_student_teacher(cfg)]
    return boxes, sizes, crops, nets


def _phase(kind: str, batch: int, device: str, threads: int, repeats: int, queue: mp.Queue) -> None:
    import torch

    from neco.losses import neco_loss

    torch.set_num_threads(threads)
    boxes, sizes, crops, nets = _setup(batch, device, kind == "model")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(1)
    teacher_out = [
        torch.nn.functional.normalize(torch.randn(batch, 37 * 37, 256, generator=gen), dim=-1).to(device)
        for _ in range(2)
    ]
    student_out = [
        torch.randn(batch, (s // 14) ** 2, 256, generator=gen).to(device).requires_grad_(True) for s in sizes
    ]
    banks = [torch.nn.functional.normalize(torch.randn(8192, 256, generator=gen), dim=-1).to(device) for _ in range(2)]
    times = []
    for _ in range(repeats + 1):  # first iteration is warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        if kind == "model":
            student, teacher = nets
            with torch.no_grad():
                teacher(crops[:2])
            out = student(crops)
            sum(o.float().sum() for o in out).backward()
        else:
            loss = neco_loss(
                teacher_out,
                student_out,
                boxes,
                sizes,
                14,
                references=banks,
                checkpoint_sort=kind == "loss_checkpointed",
            )
            loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # MiB (Linux: KiB units)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    queue.put({"kind": kind, "seconds": min(times[1:]), "peak_mib": peak})


def run(kind: str, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(kind, args.batch, args.device, args.threads, args.repeats, queue))
    proc.start()
    while True:  # a phase that fails (e.g. --device cuda without a GPU) must not leave the parent waiting
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"phase {kind!r} exited with status {proc.exitcode} (traceback above)") from None
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results = {k: run(k, args) for k in ("model", "loss", "loss_checkpointed")}
    model = results["model"]["seconds"]
    rows = []
    for kind in ("loss", "loss_checkpointed"):
        t = results[kind]["seconds"]
        rows.append((kind, t, 100 * t / (t + model), results[kind]["peak_mib"]))
    print(f"batch {args.batch}, device {args.device}, threads {args.threads}; ViT-S/14, crops 2x518 + 4x98 px")
    print(f"{'phase':<40}{'seconds':>9}{'share of step':>15}{'peak MiB':>10}")
    print(f"{'student fwd/bwd + teacher fwd':<40}{model:>9.3f}{'':>15}{results['model']['peak_mib']:>10.0f}")
    for kind, t, share, peak in rows:
        print(f"{'NeCo loss fwd/bwd (' + kind + ')':<40}{t:>9.3f}{share:>14.1f}%{peak:>10.0f}")
    print(json.dumps({"batch": args.batch, "device": args.device, **results}))


if __name__ == "__main__":
    main()
