"""C++ backend of kdfast.topk_scores (csrc/topk.cpp): buffers in, buffers out."""

from __future__ import annotations

import torch

from ..._core import backend
from ..._core.csr import canonicalize, rows_sorted


def topk_scores(queries, keys, k, excl_indptr, excl_indices, *, isa: str = "auto"):
    """Top-k keys per query on the CPU (C++/OpenMP); the contract of kdfast.ops.topk.

    queries [n_q, d], keys [n_k, d]: contiguous float32 or float64 CPU tensors (float64: dot
    products in double, rounded to float32 for ranking). The exclusion rows are sorted here when
    they are not (the kernel walks them in step with the keys). isa: "auto" or a kernel variant
    ("avx512", "avx2", "generic") for tests. Bitwise deterministic for a given isa, whatever the
    number of threads.
    """
    n_q, d = queries.shape
    n_k = keys.shape[0]
    indptr, indices = excl_indptr.contiguous(), excl_indices.contiguous()
    if not rows_sorted(indptr, indices):
        indptr, indices = canonicalize(indptr, indices, n_k)
    values = torch.empty((n_q, k), dtype=torch.float32)
    index = torch.empty((n_q, k), dtype=torch.int64)
    backend.require_ext().topk_scores(
        queries.data_ptr(),
        keys.data_ptr(),
        n_q,
        n_k,
        d,
        k,
        indptr.data_ptr(),
        indices.data_ptr(),
        values.data_ptr(),
        index.data_ptr(),
        queries.dtype == torch.float64,
        backend.num_threads(),
        isa,
    )
    return values, index
