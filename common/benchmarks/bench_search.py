"""Cost of the evaluators over a bare nearest-neighbour search of the same data, measured in the same run.

1. ``transfer_labels`` (search + softmax label transfer) vs a bare faiss ``IndexFlatIP`` search (target ratio <= 1.3).
2. ``knn_classify`` (search + weighted vote + ranking) vs a bare torch matmul + topk.

Each case runs in a fresh child process (this script with --case) so that its peak resident memory (or peak CUDA
memory) is its own.
Issue sizes: --bank 1000000 --queries 50000 --dim 384 (minutes on a GPU, long on 2 CPU cores).

    python common/benchmarks/bench_search.py --bank 200000 --queries 5000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CASES = {"transfer_labels": "bare_faiss", "knn_classify": "bare_topk"}


def measure(case: str, argv: list[str]) -> tuple[float, float]:
    """(seconds, peak MiB) of one case, run in a child process."""
    out = subprocess.run([sys.executable, __file__, *argv, "--case", case], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["peak_mib"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--backend", default="auto")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case is None:
        return report(args, sys.argv[1:] if argv is None else argv)

    import faiss

    from funai_common.hummingbird import transfer_labels
    from funai_common.knn import knn_classify

    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(args.bank, args.dim, generator=g), dim=1)
    labels = torch.softmax(torch.randn(args.bank, args.classes, generator=g), dim=1)
    queries = torch.randn(args.queries, args.dim, generator=g)
    bank_np, queries_np = bank.numpy(), queries.numpy()
    class_ids = labels.argmax(1)
    query_ids = torch.randint(0, args.classes, (args.queries,), generator=g)

    def bare_faiss():
        index = faiss.IndexFlatIP(args.dim)
        index.add(bank_np)
        index.search(queries_np, args.k)

    def label_transfer():
        transfer_labels(bank, labels, queries[:, None], k=args.k, backend=args.backend)

    def bare_topk():
        q = torch.nn.functional.normalize(queries, dim=1)
        for start in range(0, args.queries, 4096):
            torch.topk(q[start : start + 4096] @ bank.T, 20, dim=1)

    def knn():
        knn_classify(bank, class_ids, queries, query_ids, k=20, num_classes=args.classes)

    fn = {"bare_faiss": bare_faiss, "transfer_labels": label_transfer, "bare_topk": bare_topk, "knn_classify": knn}
    start = time.perf_counter()
    fn[args.case]()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def report(args, argv: list[str]) -> None:
    from funai_common.search import resolve_backend

    print(
        f"bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}, "
        f"backend {resolve_backend(args.backend)}, threads {torch.get_num_threads()}"
    )
    rows = []
    for name, baseline in CASES.items():
        base_s, base_mem = measure(baseline, argv)
        s, mem = measure(name, argv)
        rows.append((name, baseline, base_s, s, s / base_s, base_mem, mem))
    print(
        f"{'function':16s} {'baseline':11s} {'base s':>8s} {'ours s':>8s} {'ratio':>6s} "
        f"{'base MiB':>9s} {'ours MiB':>9s}"
    )
    for name, base, base_s, s, ratio, base_mem, mem in rows:
        print(f"{name:16s} {base:11s} {base_s:8.2f} {s:8.2f} {ratio:6.2f} {base_mem:9.0f} {mem:9.0f}")


if __name__ == "__main__":
    main()
