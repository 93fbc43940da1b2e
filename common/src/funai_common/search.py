"""Exact inner-product nearest-neighbour search behind one interface: faiss (GPU or CPU) or pure torch.

All backends return the same neighbours (up to exact ties) because all of them are exact flat searches.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

BACKENDS = ("auto", "torch", "faiss-cpu", "faiss-gpu")

# Upper bound on the elements of one (query chunk x bank chunk) score block of the torch backend: 2**26 floats
# (256 MiB in float32) keeps a 10-million-row bank usable on any machine.
_TORCH_BLOCK_ELEMENTS = 1 << 26


def _faiss():
    # faiss's loader logs each CPU-specific build it fails to find at INFO level: not news for a user.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_gpu_available() -> bool:
    """True when a GPU build of faiss is installed and sees at least one GPU."""
    faiss = _faiss()
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Turn ``"auto"`` into the fastest available backend for a bank on ``device``: faiss-gpu, else torch for a
    CUDA bank (a GPU matmul beats copying the bank to faiss-cpu), else faiss-cpu, else torch. An explicit backend
    that is not usable is a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if faiss_gpu_available():
            return "faiss-gpu"
        if device is not None and torch.device(device).type == "cuda":
            return "torch"
        return "faiss-cpu" if _faiss() is not None else "torch"
    # ValueError: the commands print it as one line (an ImportError / RuntimeError was a traceback)
    if backend == "faiss-cpu" and _faiss() is None:
        raise ValueError("backend 'faiss-cpu' needs faiss: pip install 'funai-common[faiss-cpu]' (or backend torch)")
    if backend == "faiss-gpu" and not faiss_gpu_available():
        raise ValueError("backend 'faiss-gpu' needs a GPU build of faiss and a visible GPU (or backend auto / torch)")
    return backend


def _to_torch(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


class NeighborIndex:
    """An exact inner-product index over a fixed bank of rows, searched many times.

    bank: (R, D) features. ``bank_dtype=torch.float16`` halves the memory of the bank (torch: a float16 tensor;
    faiss-gpu: ``useFloat16``; faiss-cpu: an fp16 scalar quantizer, i.e. the same rounding); the queries stay float32
    and the torch backend computes every score in float32 from the rounded rows.
    """

    def __init__(self, bank, backend: str = "auto", bank_dtype: torch.dtype | None = None, chunk_size: int = 4096):
        bank = _to_torch(bank)
        if bank.ndim != 2:
            raise ValueError(f"bank must be 2-D (rows, dim), got shape {tuple(bank.shape)}")
        self.backend = resolve_backend(backend, bank.device)
        self.num_rows, self.dim = bank.shape
        self.chunk_size = chunk_size
        self.device = bank.device
        half = bank_dtype == torch.float16
        if self.backend == "torch":
            self.bank = bank.to(bank_dtype or torch.float32)
            return
        faiss = _faiss()
        array = np.ascontiguousarray(bank.detach().float().cpu().numpy())
        if self.backend == "faiss-gpu":
            self._resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.useFloat16 = half
            config.device = bank.device.index if bank.device.type == "cuda" and bank.device.index is not None else 0
            self.index = faiss.GpuIndexFlatIP(self._resources, self.dim, config)
        elif half:
            self.index = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(array)

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scores (M, k) float32, indices (M, k) long), the k largest inner products, sorted descending."""
        queries = _to_torch(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (M, {self.dim}), got {tuple(queries.shape)}")
        if not 1 <= k <= self.num_rows:
            raise ValueError(f"k must be in [1, {self.num_rows}] (rows in the bank), got {k}")
        if self.backend == "torch":
            return self._search_torch(queries, k)
        out_device = queries.device
        scores, indices = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return torch.from_numpy(scores).to(out_device), torch.from_numpy(indices).long().to(out_device)

    def _search_torch(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q_chunk = max(1, min(self.chunk_size, queries.shape[0]))
        bank_chunk = max(k, _TORCH_BLOCK_ELEMENTS // q_chunk)
        if self.bank.dtype != torch.float32:  # each block is widened to float32: bound that copy too
            bank_chunk = max(k, min(bank_chunk, _TORCH_BLOCK_ELEMENTS // max(1, self.dim)))
        all_scores, all_indices = [], []
        for start in range(0, queries.shape[0], q_chunk):
            q = queries[start : start + q_chunk].to(self.bank.device, torch.float32)
            best_s, best_i = None, None
            for b_start in range(0, self.num_rows, bank_chunk):
                block = self.bank[b_start : b_start + bank_chunk].float()  # a float16 bank: exact scores of its rows
                s, i = torch.topk(q @ block.T, min(k, block.shape[0]), dim=1)
                i = i + b_start
                if best_s is not None:
                    s, pos = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
                    i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
                best_s, best_i = s, i
            all_scores.append(best_s)
            all_indices.append(best_i)
        return torch.cat(all_scores).to(queries.device), torch.cat(all_indices).to(queries.device)


def nearest_neighbors(queries, bank, k: int, backend: str = "auto", chunk_size: int = 4096):
    """The k rows of ``bank`` (R, D) with the largest inner product with each query (M, D).

    Returns (scores (M, k) float32, indices (M, k) long), sorted by decreasing score.
    """
    return NeighborIndex(bank, backend=backend, chunk_size=chunk_size).search(queries, k)
