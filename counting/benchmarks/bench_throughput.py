"""Throughput: self-collage generation per data-loader worker vs. what a training step consumes, and evaluation speed.

1. collages/s of one worker (1 thread) at 224 px: (a) in-memory procedural objects (sampler cost alone) and
   (b) a file pool (JPEG decode of 20 object images + masks per collage, as with ImageNet).
2. samples/s consumed by a training step of UnCounTR with a ViT-S/16 backbone (random weights, real size) and the
   paper's head, batch 8, 3 shots, forward + backward + AdamW.
3. evaluation images/s with the full FSC-147 protocol (384 x 576 image: 3 sliding windows; and with 3x3 tiling).
Prints the ratio collages/s per worker / samples/s per step: the workers needed to keep the step fed = 1 / ratio.

    python counting/benchmarks/bench_throughput.py [--threads 2] [--collages 40] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from counting.collage import CollageConfig, SelfCollageGenerator
from counting.eval import density_fn_for
from counting.inference import count_image
from counting.losses import density_mse_loss
from counting.models import UnCounTR, build_backbone
from counting.pools import FileObjectPool
from counting.synthetic import synthetic_backgrounds, synthetic_object_pool


def collage_rate(generator: SelfCollageGenerator, n: int) -> float:
    generator.sample(np.random.default_rng(10_000))  # warm-up
    start = time.perf_counter()
    for i in range(n):
        generator.sample(np.random.default_rng(i))
    return n / (time.perf_counter() - start)


def file_pool(root: Path, num_clusters: int = 2, per_cluster: int = 20) -> FileObjectPool:
    """JPEG objects (ImageNet-like 500 x 375) with a mask shard and a cluster file in ``root``."""
    images_dir, masks_dir = root / "images", root / "masks"
    images_dir.mkdir()
    masks_dir.mkdir()
    rng = np.random.default_rng(0)
    names, masks = [], []
    for i in range(num_clusters * per_cluster):
        name = f"obj_{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(images_dir / name, quality=90)
        mask = np.zeros((224, 224), dtype=np.uint8)
        mask[40:180, 60:170] = 1
        names.append(name)
        masks.append(mask)
    n = len(names)
    (masks_dir / "index.json").write_text(json.dumps({"images": names, "shard_size": n, "mask_size": 224}))
    save_file({"masks": torch.from_numpy(np.stack(masks))}, str(masks_dir / f"masks_{0:08d}_{n:08d}.safetensors"))
    ids = torch.arange(n) // per_cluster
    save_file({"assignments": ids}, str(root / "clusters.safetensors"))
    return FileObjectPool(images_dir, masks_dir, root / "clusters.safetensors")


def paper_head(backbone) -> UnCounTR:
    return UnCounTR(backbone, img_size=224, fim_dim=512, fim_depth=2, fim_heads=16, decoder_width=256)


def step_rate(batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = paper_head(build_backbone("vit_s_16", pretrained=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    images, crops = torch.randn(batch, 3, 224, 224), torch.randn(batch, 3, 3, 64, 64)
    target = torch.rand(batch, 224, 224)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = density_mse_loss(model(images, crops), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[1:]))


@torch.no_grad()
def eval_rate(images: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = paper_head(build_backbone("vit_s_16", pretrained=False)).eval()
    image, crops = torch.randn(1, 3, 384, 576), torch.randn(3, 3, 64, 64)
    rates = []
    for rects in (torch.tensor([[10, 10, 40, 40]] * 3), torch.tensor([[10, 10, 15, 15]] * 3)):  # untiled, tiled
        start = time.perf_counter()
        for _ in range(images):
            count_image(density_fn_for(model, crops), image, rects)
        rates.append(images / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the training step / evaluation")
    parser.add_argument("--collages", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)  # one data-loader worker
    backgrounds = synthetic_backgrounds(num_noise=4, size=256, with_skimage=False)
    memory = SelfCollageGenerator(synthetic_object_pool(4, 20, 224), backgrounds, CollageConfig())
    mem_rate = collage_rate(memory, args.collages)
    with tempfile.TemporaryDirectory() as tmp:
        files = SelfCollageGenerator(file_pool(Path(tmp)), backgrounds, CollageConfig())
        file_rate = collage_rate(files, max(args.collages // 2, 5))

    torch.set_num_threads(args.threads)
    consumed = step_rate(8, args.steps)
    untiled, tiled = eval_rate(args.eval_images)
    print(f"collages/s per worker, in-memory objects : {mem_rate:8.2f}")
    print(f"collages/s per worker, JPEG object files : {file_rate:8.2f}")
    print(f"training step (ViT-S/16, batch 8, {args.threads} threads) : {consumed:8.2f} samples/s")
    print(
        f"ratio worker/step (in-memory)            : {mem_rate / consumed:8.2f}  -> {consumed / mem_rate:.2f} workers"
    )
    print(
        f"ratio worker/step (JPEG files)           : {file_rate / consumed:8.2f}  -> {consumed / file_rate:.2f} workers"
    )
    print(f"eval images/s, full protocol 384x576     : {untiled:8.3f} (3 windows), {tiled:.3f} with 3x3 tiling")


if __name__ == "__main__":
    main()
