"""C++ backend of kdfast.rank_of_ids (csrc/rank_of_ids.cpp): buffers in, buffers out."""

from __future__ import annotations

import torch

from ..._core import backend
from ..._core.csr import canonicalize


def rank_of_ids(queries, keys, ids, excl_indptr, excl_indices, max_rank=-1, *, isa: str = "auto"):
    """Ranks [n_q, m] int64 of the given key ids per query on the CPU (C++/OpenMP); the contract of
    kdfast.ops.rank_of_ids.

    queries [n_q, d], keys [n_k, d]: contiguous float32 or float64 CPU tensors (float64: dot
    products in double, rounded to float32 for ranking); ids int64 [n_q, m] in [-1, n_k). The
    exclusion rows are made canonical here (sorted, each id once: the kernel takes every excluded
    key back once). max_rank >= 0: ranks at or above it come out as max_rank (the kernel then
    stops counting for given keys known to rank that low, and skips keys below all the others);
    -1: none. isa: "auto" or a kernel variant ("avx512", "avx2", "generic") for tests.
    Bitwise deterministic for a given isa, whatever the number of threads.
    """
    n_q, d = queries.shape
    n_k, m = keys.shape[0], ids.shape[1]
    indptr, indices = canonicalize(excl_indptr, excl_indices, n_k)
    indptr, indices = indptr.contiguous(), indices.contiguous()
    ids = ids.contiguous()
    out = torch.empty((n_q, m), dtype=torch.int64)
    backend.require_ext().rank_of_ids(
        queries.data_ptr(),
        keys.data_ptr(),
        n_q,
        n_k,
        d,
        m,
        ids.data_ptr(),
        indptr.data_ptr(),
        indices.data_ptr(),
        out.data_ptr(),
        int(max_rank),
        queries.dtype == torch.float64,
        backend.num_threads(),
        isa,
    )
    return out
