"""PIN benchmarks (CPU, tiny BLIP-2): data throughput vs training consumption; PIN vs VPT vs LoRA cost.

    python pin/benchmarks/bench_pin.py [--steps 20] [--rounds 5] [--compositions 100] [--batch-size 16]

1. Compositions per second of one data-loader worker at 224 px (procedural objects and backgrounds) against the
   compositions per second one training step consumes on the tiny BLIP-2: ratio > 1 means one worker keeps up.
2. Trainable parameters and step time (median of interleaved rounds) of PIN, VPT-shallow and LoRA on the same tiny
   BLIP-2, as ratios to PIN, plus the trainable-parameter counts at the paper's scale (BLIP-2 EVA ViT-g/14, built on
   the meta device).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pin.config import config_path, load_yaml
from pin.methods import Method
from pin.pipeline import codec_from_cfg, dataset_from_cfg, pools_from_cfg, training_loss, vlm_from_cfg
from pin.synthetic import collate


class Trainer:
    """One method on its own tiny BLIP-2, with an optimiser; `time(steps)` returns seconds per training step."""

    def __init__(self, cfg, method_name: str, batch) -> None:
        self.vlm = vlm_from_cfg(cfg)
        self.method = Method(self.vlm, method_name, cfg)
        self.params = self.method.parameters()
        self.opt = torch.optim.Adam(self.params, lr=1e-3, foreach=True)
        self.codec, self.batch = codec_from_cfg(cfg), batch
        self.time(2)  # warm-up

    def time(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = training_loss(self.vlm, self.codec, self.batch, "cpu")
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return (time.perf_counter() - start) / steps


def paper_scale_counts() -> dict[str, int]:
    """Trainable parameters at BLIP-2 scale (vision tower on the meta device: no memory, no weights)."""
    from transformers import Blip2Config
    from transformers.models.blip_2.modeling_blip_2 import Blip2VisionModel

    from pin.model import PositionalInsert

    vcfg = Blip2Config().vision_config
    n = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    counts = {"pin": sum(p.numel() for p in PositionalInsert(n, vcfg.hidden_size).parameters())}
    counts["vpt"] = 20 * vcfg.hidden_size
    try:
        from peft import LoraConfig, inject_adapter_in_model

        with torch.device("meta"):
            vision = Blip2VisionModel(vcfg)
            inject_adapter_in_model(
                LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "projection", "fc1", "fc2"]), vision
            )
        counts["lora"] = sum(p.numel() for name, p in vision.named_parameters() if "lora_" in name)
    except ImportError:
        pass
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per method and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median step time is reported")
    parser.add_argument("--compositions", type=int, default=100, help="compositions timed for the data worker")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_yaml(config_path("tiny"))
    cfg["_cli"] = {}
    cfg["data"].update(train_size=max(args.compositions, args.batch_size), switch_epoch=10**6)
    pool, _, _ = pools_from_cfg(cfg)
    ds = dataset_from_cfg(cfg, pool, "train")
    ds[0]
    start = time.perf_counter()
    for i in range(args.compositions):
        ds[i]
    per_worker = args.compositions / (time.perf_counter() - start)
    batch = collate([ds[i] for i in range(args.batch_size)])

    trainers = {}
    for name in ("pin", "vpt", "lora"):
        try:
            trainers[name] = Trainer(cfg, name, batch)
        except ImportError as err:
            print(f"{name}: skipped ({err})")
    times = {name: [] for name in trainers}
    for _ in range(args.rounds):  # interleaved, so that load changes on a shared machine hit every method alike
        for name, trainer in trainers.items():
            times[name].append(trainer.time(args.steps))
    rows = {name: (sum(p.numel() for p in t.params), statistics.median(times[name])) for name, t in trainers.items()}
    consumed = args.batch_size / rows["pin"][1]
    print(f"data: {per_worker:.1f} compositions/s per worker (224 px, 3 objects, procedural pool)")
    print(f"training (tiny BLIP-2, batch {args.batch_size}, 1 thread): {consumed:.1f} compositions/s consumed")
    print(f"ratio worker/consumption: {per_worker / consumed:.2f} (workers needed: {consumed / per_worker:.2f})")
    print("\n| method | trainable params (tiny) | step time (s) | params / PIN | time / PIN |")
    print("|---|---|---|---|---|")
    pin_params, pin_time = rows["pin"]
    for name, (params, t) in rows.items():
        print(f"| {name} | {params:,} | {t:.3f} | {params / pin_params:.2f} | {t / pin_time:.2f} |")
    print("\ntrainable parameters at BLIP-2 scale (EVA ViT-g/14, 257 x 1408 tokens):")
    for name, count in paper_scale_counts().items():
        print(f"  {name}: {count:,}")


if __name__ == "__main__":
    main()
