"""ShareLock benchmarks on CPU, each against a baseline measured in the same run:

1. LLM caption features: length-bucketed batches of 64 vs one caption per call (the reference precompute script),
   tiny random Llama.
2. Feature store: random batches of 1024 rows from contiguous memory-mapped shards vs one file per sample (the
   reference stores one `torch.save`d tensor per sample).
3. Training: optimizer steps/s of the full `fit` loop reading from a feature store vs the bare head update on
   in-memory tensors.

Usage: python sharelock/benchmarks/benchmark.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def bench_llm(n: int, hidden: int) -> dict:
    from sharelock.features import last_token_features
    from sharelock.tiny import build_tiny_llama, build_word_tokenizer

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 30)))) for _ in range(n)]
    tokenizer = build_word_tokenizer(texts)
    model = build_tiny_llama(len(tokenizer), hidden_size=hidden, layers=2)
    last_token_features(model, tokenizer, texts[:8], batch_size=8)  # warm-up
    times = {"batched": [0.0, 0.0], "single": [0.0, 0.0]}
    batched, single = [], []
    for start in range(0, n, 128):  # interleaved chunks: load changes on a shared machine hit both sides alike
        chunk = texts[start : start + 128]
        for name, fn, out in (
            ("batched", lambda c: last_token_features(model, tokenizer, c, batch_size=64), batched),
            ("single", lambda c: torch.cat([last_token_features(model, tokenizer, [s], 1) for s in c]), single),
        ):
            wall, cpu = time.perf_counter(), time.process_time()
            out.append(fn(chunk))
            times[name][0] += time.perf_counter() - wall
            times[name][1] += time.process_time() - cpu
    diff = (torch.cat(batched) - torch.cat(single)).abs().max().item()
    return {
        "model": f"Llama hidden {hidden}, 2 layers, {n} captions of 5-30 words",
        "batched 64 (captions/s, wall)": n / times["batched"][0],
        "one per call (captions/s, wall)": n / times["single"][0],
        "speed-up (wall)": times["single"][0] / times["batched"][0],
        "speed-up (CPU time)": times["single"][1] / times["batched"][1],
        "max |batched - single|": diff,
    }


def bench_store(n: int, dim: int, batches: int) -> dict:
    from sharelock.store import FeatureStore, FeatureWriter

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    ids = [str(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with FeatureWriter(tmp / "store", "m", "image", dim, shard_size=10000) as w:
            w.add(ids, feats)
        (tmp / "files").mkdir()
        for i in range(n):
            torch.save(torch.from_numpy(feats[i]), tmp / "files" / f"{i}_features.pt")
        store = FeatureStore(tmp / "store")
        draws = [rng.choice(n, size=1024, replace=False) for _ in range(batches)]
        store.rows(draws[0])  # warm-up: page cache for both
        for i in draws[0]:
            torch.load(tmp / "files" / f"{i}_features.pt", weights_only=True)
        t = time.perf_counter()
        for d in draws:
            out = store.get([ids[i] for i in d])
        t_store = time.perf_counter() - t
        t = time.perf_counter()
        for d in draws:
            ref = torch.stack([torch.load(tmp / "files" / f"{i}_features.pt", weights_only=True) for i in d])
        t_files = time.perf_counter() - t
        assert torch.equal(out, ref)
    return {
        "rows x dim": f"{n} x {dim}",
        "store (batches of 1024/s)": batches / t_store,
        "one file per sample (batches/s)": batches / t_files,
        "speed-up": t_files / t_store,
    }


def bench_train(n: int, dv: int, dt: int, hidden: int, batch: int, steps: int) -> dict:
    from sharelock import train
    from sharelock.losses import clip_loss
    from sharelock.models import ShareLock
    from sharelock.store import FeatureWriter
    from sharelock.training import build_optimizer

    rng = np.random.default_rng(0)
    v = rng.normal(size=(n, dv)).astype(np.float32)
    t_feats = rng.normal(size=(n, dt)).astype(np.float32)
    ids = [str(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, f, modality in (("v", v, "image"), ("t", t_feats, "text")):
            with FeatureWriter(tmp / name, "m", modality, f.shape[1]) as w:
                w.add(ids, f)
        datasets = json.dumps([{"vision": str(tmp / "v"), "text": str(tmp / "t")}])
        args = [f"data.datasets={datasets}", "data.val_size=0.05", f"model.hidden_dim={hidden}",
                f"optim.batch_size={batch}", "optim.accumulate_grad_batches=1", "val_check_interval=100000",
                f"checkpoint_every={10 * steps}", f"log_every={10 * steps}"]  # fmt: skip
        train.main(args + [f"run_dir={tmp / 'warmup'}", "optim.max_steps=2"])
        t = time.perf_counter()
        train.main(args + [f"run_dir={tmp / 'run'}", f"optim.max_steps={steps}"])
        t_fit = time.perf_counter() - t
    torch.manual_seed(0)
    model = ShareLock(dv, dt, hidden_dim=hidden)
    opt, sched = build_optimizer(model.parameters(), total_steps=steps)
    vt, tt = torch.from_numpy(v), torch.from_numpy(t_feats)
    t = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,))
        loss = clip_loss(*model(vt[idx], tt[idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    t_bare = time.perf_counter() - t
    return {
        "head": f"{dt}->{hidden}x3->{dv}, batch {batch}",
        "fit loop (steps/s)": steps / t_fit,
        "bare update (steps/s)": steps / t_bare,
        "fit / bare": t_bare / t_fit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: on a shared machine more threads mostly measure contention
    q = args.quick
    results = {
        "llm_features_tiny": bench_llm(n=128 if q else 512, hidden=64),
        "llm_features_256": bench_llm(n=128 if q else 512, hidden=256),
        "feature_store": bench_store(n=2000 if q else 20000, dim=768, batches=3 if q else 20),
        "training": bench_train(n=4096, dv=384, dt=1024, hidden=1024, batch=256, steps=5 if q else 40),
    }
    for name, rows in results.items():
        print(f"\n{name}")
        for key, value in rows.items():
            print(f"  {key:36s} {value:.4g}" if isinstance(value, float) else f"  {key:36s} {value}")
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
