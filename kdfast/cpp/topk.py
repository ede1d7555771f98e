"""C++ glue for kdfast.topk_scores: checks the buffers, preallocates the outputs, calls kdfast._C."""
from __future__ import annotations

import torch

from .. import _backend
from ..csr import canonicalize


def _sorted_rows(indptr: torch.Tensor, indices: torch.Tensor) -> bool:
    """Whether the ids inside every CSR row are non-decreasing (what the kernel's pointer walk needs)."""
    if indices.numel() < 2:
        return True
    ok = indices[1:] >= indices[:-1]
    starts = indptr[1:-1]
    starts = starts[(starts > 0) & (starts < indices.numel())]
    ok[starts - 1] = True  # a new row may start lower
    return bool(ok.all())


def topk_scores(queries, keys, k, excl_indptr, excl_indices, *, isa: str = "auto"):
    """Top-k keys per query on the CPU (C++/OpenMP); same contract as kdfast.reference.topk.topk_scores.

    queries [n_q, d], keys [n_k, d]: float32 or float64 CPU tensors (float64: dot products in double,
    rounded to float32 for ranking). excl_indptr [n_q+1] / excl_indices: int64 CSR of excluded key ids
    (validated by the caller; rows are sorted here when they are not). isa: "auto" or a kernel variant
    ("avx512", "avx2", "generic") for tests. Returns values [n_q, k] float32 and indices [n_q, k] int64.
    Bitwise deterministic for a given isa, whatever the number of threads.
    """
    ext = _backend.ext()
    if ext is None:
        raise RuntimeError("the C++ extension kdfast._C is not built")
    if queries.dtype not in (torch.float32, torch.float64) or keys.dtype != queries.dtype:
        raise TypeError(f"the cpp backend takes float32 or float64 queries and keys, got {queries.dtype} and {keys.dtype}")
    if queries.device.type != "cpu" or keys.device.type != "cpu":
        raise ValueError("the cpp backend takes CPU tensors")
    n_q, d = queries.shape
    n_k = keys.shape[0]
    if n_k >= 2**32:
        raise ValueError(f"keys must have fewer than 2^32 rows, got {n_k}")
    queries, keys = queries.contiguous(), keys.contiguous()
    indptr = excl_indptr.to(torch.int64).contiguous()
    indices = excl_indices.to(torch.int64).contiguous()
    if not _sorted_rows(indptr, indices):
        indptr, indices = canonicalize(indptr, indices, n_k)
    values = torch.empty((n_q, k), dtype=torch.float32)
    index = torch.empty((n_q, k), dtype=torch.int64)
    ext.topk_scores(queries.data_ptr(), keys.data_ptr(), n_q, n_k, d, k, indptr.data_ptr(), indices.data_ptr(),
                    values.data_ptr(), index.data_ptr(), queries.dtype == torch.float64,
                    _backend.num_threads(), isa)
    return values, index
