"""Throughput of FUNGIExtractor (3 paper objectives) against baselines measured in the same run.

    python benchmarks/benchmark_extraction.py [--model vit_small_patch16_224] [--batch-size 8] [--iters 1]
        [--device cpu] [--img-size 224] [--threads 2]

Methods (all on the same views, same heads, same chunks of whole samples):
  embeddings      plain forward of the batch (no gradients): the baseline feature cost
  fungi           FUNGIExtractor: views, batched per-sample gradients (frozen prefix without autograd), projection
  plain fwd+bwd   standard autograd forward + backward of the mean loss per objective (one batch-summed gradient)
  per-sample loop one autograd forward + backward per sample and objective (the obvious per-sample method)
Random weights (no download); timings are wall-clock seconds per batch.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from fungi import FUNGIExtractor
from fungi.gradients import per_sample_gradients_loop


def plain_forward_backward(ex: FUNGIExtractor, x: torch.Tensor) -> None:
    """Standard training-style step per objective: full autograd graph, backward of the summed loss."""
    linear = ex.linear
    linear.requires_grad_(True)
    try:
        for name in ex.objective_names:
            obj = ex.objectives[name]
            num_views = len(obj.views(x[:1], ex.seed)[0])
            chunk = max(1, ex.max_views_per_pass // num_views)
            for start in range(0, len(x), chunk):
                views = obj.views(x[start : start + chunk], ex.seed)
                emb = ex.model(views.flatten(0, 1)).reshape(views.shape[0], views.shape[1], -1)
                torch.autograd.grad(obj(emb).sum(), [linear.weight, linear.bias])
    finally:
        linear.requires_grad_(False)


def per_sample_loop(ex: FUNGIExtractor, x: torch.Tensor) -> None:
    """One autograd forward + backward per sample and objective."""
    for name in ex.objective_names:
        obj = ex.objectives[name]
        per_sample_gradients_loop(ex.model, ex.layer, obj.views(x, ex.seed), obj)


def timed(fn, iters: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) per iteration."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=1, help="iterations per timing")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest is reported")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-views-per-pass", type=int, default=64, help="chunking for every method (memory)")
    parser.add_argument("--loop-images", type=int, default=None, help="time the per-sample loop on the first N images")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size)
    ex = FUNGIExtractor(model, seed=42, device=args.device, max_views_per_pass=args.max_views_per_pass)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(args.device)
    bank = [torch.randn(3, args.img_size, args.img_size, generator=gen) for _ in range(4)]
    ex.setup(bank)  # 4 negative images x 49 views (the paper uses 256; the bank size does not change the cost much)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(fn):
        def wrapped():
            fn()
            sync()

        return wrapped

    with torch.no_grad():
        ex(x[:1])  # warm-up on one image: builds the projection, first-call allocations
    # Methods are interleaved over rounds and the fastest round is kept. On a shared machine wall time swings with the
    # other processes' load; the CPU time of this process (all threads) is much steadier, so ratios use both.
    loop_images = args.loop_images or args.batch_size
    methods = {
        "embeddings": lambda: ex.embed(x),
        "fungi": lambda: ex(x),
        "plain fwd+bwd": lambda: plain_forward_backward(ex, x),
        "per-sample loop": lambda: per_sample_loop(ex, x[:loop_images]),
    }
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for round_index in range(args.rounds):
        for name, fn in methods.items():
            seconds, cpu_seconds = timed(run(fn), args.iters)
            if name == "per-sample loop":  # linear in the number of images
                seconds, cpu_seconds = (t * args.batch_size / loop_images for t in (seconds, cpu_seconds))
            wall[name] = min(wall.get(name, float("inf")), seconds)
            cpu[name] = min(cpu.get(name, float("inf")), cpu_seconds)
            print(f"round {round_index}: {name} {seconds:.2f} s/batch wall, {cpu_seconds:.2f} s CPU", flush=True)
    views = {n: len(ex.objectives[n].views(x[:1], ex.seed)[0]) for n in ex.objective_names}
    print(
        f"{args.model} (random weights), {args.img_size}px, batch {args.batch_size}, device {args.device}, "
        f"threads {args.threads}, iters {args.iters}, best of {args.rounds} rounds, views per image {views}, "
        f"per-sample loop timed on "
        f"{loop_images} image(s) and scaled to the batch"
    )
    print(f"{'method':<16} {'wall s/batch':>12} {'img/s':>7} {'CPU s/batch':>12} {'CPU vs fungi':>13}")
    for name in methods:
        print(
            f"{name:<16} {wall[name]:>12.2f} {args.batch_size / wall[name]:>7.3f} {cpu[name]:>12.2f} "
            f"{cpu[name] / cpu['fungi']:>12.2f}x"
        )
    print(
        f"fungi / plain fwd+bwd: wall {wall['fungi'] / wall['plain fwd+bwd']:.2f}, "
        f"CPU {cpu['fungi'] / cpu['plain fwd+bwd']:.2f} (target <= 1.3)"
    )


if __name__ == "__main__":
    main()
