"""Clip loading throughput of the DoRA data pipeline against the reference approach, and against training.

Writes a 1080p 60 fps H.264 video (synthetic walking scene with detailed texture), then measures clips per second
(8 frames 60 apart -> one 224 global view + 6 local 112 views, the paper's augmentation) for
  reference : reopen the file for every clip, seek, decode and convert every frame at full resolution, then augment
              (what WTDataloader does with decord at 4K);
  ours      : the decoder kept open, frames converted at the training resolution (short side 320), requests of a
              batch grouped (window 1 = uniformly random clips, as in the paper; window 8 = neighbouring clips);
  cache     : the one-time JPEG frame cache at short side 320;
and the training step's consumption: clips/s of a ViT-S/16 DoRA step (teacher, tracking, student on 3 masked
views and 6 local crops of 8 frames, backward, AdamW, EMA) at batch 2 on this CPU. All in one process, one thread
per library where possible, so that the ratios are comparable.

    python benchmarks/loader_throughput.py [--frames 600] [--clips 16] [--train-steps 2]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dora.augment import ClipAugmentation
from dora.data import ClipBatchSampler, VideoClipDataset
from dora.synthetic import walking_frames, write_video
from dora.video import build_frame_cache

T, STEP = 8, 60


def textured_frames(n: int, height: int = 1080, width: int = 1920):
    rng = np.random.default_rng(0)
    noise = rng.integers(-40, 40, (height, width * 2, 1), dtype=np.int16)
    # the texture classes: the video of the published figures (its colours are random, the hue classes' are not)
    frames = walking_frames(n, size=height, width=width, num_objects=6, seed=0, speed=4.0, classes="texture")
    for t, frame in enumerate(frames):
        off = (4 * t) % width
        yield np.clip(frame.astype(np.int16) + noise[:, off : off + width], 0, 255).astype(np.uint8)


def reference_clip(path: Path, start: int) -> np.ndarray:
    """Reopen, seek, decode every frame up to the last one at full resolution (the reference's per-item work)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        fps, tb = s.average_rate, s.time_base
        wanted = set(range(start, start + T * STEP, STEP))
        c.seek(int(start / fps / tb), stream=s, backward=True)
        out = {}
        for frame in c.decode(s):
            i = round(frame.pts * tb * fps)
            arr = frame.to_ndarray(format="rgb24")  # full-resolution RGB conversion of every decoded frame
            if i in wanted:
                out[i] = arr
            if i >= start + (T - 1) * STEP:
                break
    return np.stack([out[i] for i in sorted(out)])


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600, help="video length (60 fps)")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.frames <= T * STEP:
        parser.error(f"--frames must exceed {T * STEP} (one clip of {T} frames {STEP} apart)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dora_bench_") as tmp:
        measure(args, Path(tmp))


def measure(args, tmp: Path) -> None:
    """Write the 1080p video under ``tmp``, time the loaders and the training step, print the table."""
    t0 = time.perf_counter()
    video = write_video(tmp / "walk1080p.mp4", textured_frames(args.frames), fps=60, crf=23)
    print(
        f"wrote {video} ({video.stat().st_size / 1e6:.1f} MB, {args.frames} frames 1920x1080 @60fps) "
        f"in {time.perf_counter() - t0:.0f}s"
    )
    aug = ClipAugmentation()
    g = torch.Generator().manual_seed(0)
    num_clips = args.frames - T * STEP
    rng = random.Random(0)
    starts = [rng.randrange(num_clips) for _ in range(args.clips)]

    results = {}
    results["reference (reopen + full-res decode per clip)"] = rate(
        lambda: [aug(reference_clip(video, s), g) for s in starts], args.clips
    )
    for window in (1, 8):
        ds = VideoClipDataset([video], T, STEP, aug, short_side=320)
        sampler = ClipBatchSampler(len(ds), batch_size=8, seed=0, window=window)
        batches = list(sampler)[: max(1, args.clips // 8)]
        n = sum(len(b) for b in batches)
        results[f"ours, open decoder @320p, window {window}"] = rate(
            lambda ds=ds, batches=batches: [ds.__getitems__(b) for b in batches], n
        )
    t1 = time.perf_counter()
    cache = build_frame_cache(video, tmp / "cache", short_side=320)
    cache_build = time.perf_counter() - t1
    ds = VideoClipDataset([cache], T, STEP, aug)
    batches = list(ClipBatchSampler(len(ds), batch_size=8, seed=0))[: max(1, args.clips // 8)]
    results["ours, JPEG frame cache @320p, window 1"] = rate(
        lambda: [ds.__getitems__(b) for b in batches], sum(len(b) for b in batches)
    )

    # training-step consumption: ViT-S/16, batch 2, paper settings
    from dora.config import load_config
    from dora.losses import DoRALoss
    from dora.models import build_network
    from dora.train import dora_step, param_groups

    cfg = load_config(["--config", "wt_venice", "model.out_dim=65536"])
    student, teacher = build_network(cfg), build_network(cfg, teacher=True)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = DoRALoss(65536, 6)
    opt = torch.optim.AdamW(param_groups(student), lr=1e-4)
    glob = torch.randn(2, T, 3, 224, 224)
    locals_ = [torch.randn(2, T, 3, 112, 112) for _ in range(6)]

    class Null:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def step():
        loss, _ = dora_step(student, teacher, loss_fn, glob, locals_, 0, [0, 2, 4], cfg, Null)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    train_rate = rate(lambda: [step() for _ in range(args.train_steps)], 2 * args.train_steps)

    ref = results["reference (reopen + full-res decode per clip)"]
    print(f"\n{'pipeline':<48} {'clips/s':>8} {'x reference':>12} {'x training':>11}")
    for name, r in results.items():
        print(f"{name:<48} {r:>8.2f} {r / ref:>12.2f} {r / train_rate:>11.2f}")
    print(
        f"{'training step ViT-S/16, batch 2 (consumption)':<48} {train_rate:>8.2f} {train_rate / ref:>12.2f} {1:>11.2f}"
    )
    print(f"\nframe cache build: {cache_build:.1f}s for {args.frames} frames; torch threads {args.threads}")


if __name__ == "__main__":
    main()
