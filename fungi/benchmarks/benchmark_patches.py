"""Cost of per-patch FUNGI features (Hummingbird) against baselines measured in the same run.

    python benchmarks/benchmark_patches.py [--model vit_small_patch16_224] [--img-size 224] [--batch-size 4]
        [--support 102400] [--iters 2] [--threads 2] [--device cpu]

Methods, on the same images:
  tokens          plain forward, patch tokens (what funai-hummingbird scores): the baseline
  fwd+bwd         one standard autograd forward + backward of the same per-image loss (batch-summed gradient)
  patch FUNGI     PatchFUNGI features: neighbour search in the support bank, pooled loss, per-token gradients of
                  attn.proj for every patch, projection, concatenation
Random weights and a random support bank of --support rows (no download); wall-clock seconds per batch.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from fungi.gradients import get_linear
from fungi.patches import PatchFUNGI


def timed(fn, iters: int) -> float:
    """Wall seconds per iteration after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--support", type=int, default=102400, help="rows of the support bank (paper: 102,400)")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size).eval()
    model.to(args.device).requires_grad_(False)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    pf = PatchFUNGI(model, device=args.device)
    pf.set_memory(torch.randn(args.support, model.num_features, device=args.device))
    linear = get_linear(pf.tokens, pf.layer)

    @torch.no_grad()
    def tokens() -> None:
        model.forward_features(images)

    def forward_backward() -> None:
        linear.requires_grad_(True)
        try:
            loss = pf.loss(model.forward_features(images)).sum()
            torch.autograd.grad(loss, [linear.weight, linear.bias])
        finally:
            linear.requires_grad_(False)

    def patch_fungi() -> None:
        with torch.no_grad():  # as inside HummingbirdEvaluator; PatchFUNGI enables autograd where it needs it
            pf(images)

    results = {"tokens": timed(tokens, args.iters)}
    results["fwd+bwd"] = timed(forward_backward, args.iters)
    results["patch FUNGI"] = timed(patch_fungi, args.iters)
    base = results["tokens"]
    print(f"{args.model} at {args.img_size} px, batch {args.batch_size}, support {args.support} rows, {args.device}")
    print("| method | s / batch | images / s | x tokens | x fwd+bwd |\n|---|---|---|---|---|")
    for name, sec in results.items():
        print(
            f"| {name} | {sec:.3f} | {args.batch_size / sec:.2f} | {sec / base:.2f} | {sec / results['fwd+bwd']:.2f} |"
        )
    return results


if __name__ == "__main__":
    main()
