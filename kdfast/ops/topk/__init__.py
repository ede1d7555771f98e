"""kdfast.topk_scores: each query's top-k keys by dot product, with per-query exclusions.

Backends (one row each in BACKENDS, the same function in each module):
    topk_scores(queries, keys, k, excl_indptr, excl_indices) -> (values [n_q, k] float32, indices
        int64)
with queries/keys contiguous, n_q >= 1, n_k >= 1, and the exclusions a validated int64 CSR.
"""

from __future__ import annotations

import torch

from ..._core import backend as _backend
from ..._core import checks
from ..._core.csr import as_csr, validate_csr
from . import cpu, reference


def _triton():
    from . import triton  # on first use: Triton reads TRITON_INTERPRET when the kernels are defined

    return triton


BACKENDS = {"torch": lambda: reference, "cpp": lambda: cpu, "triton": _triton}


def _empty_result(queries, k):
    n_q = queries.shape[0]
    return (
        torch.full((n_q, k), float("-inf"), dtype=torch.float32, device=queries.device),
        torch.full((n_q, k), -1, dtype=torch.int64, device=queries.device),
    )


@torch.library.custom_op("kdfast::topk_scores", mutates_args=())
def _topk_op(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    excl_indptr: torch.Tensor,
    excl_indices: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    validate_csr(excl_indptr, excl_indices, "exclude", keys.shape[0])
    if queries.shape[0] == 0 or keys.shape[0] == 0:
        return _empty_result(queries, k)
    impl = BACKENDS[backend]()
    return impl.topk_scores(queries.contiguous(), keys.contiguous(), k, excl_indptr, excl_indices)


@_topk_op.register_fake
def _(queries, keys, k, excl_indptr, excl_indices, backend):
    n_q = queries.shape[0]
    return (
        queries.new_empty((n_q, k), dtype=torch.float32),
        queries.new_empty((n_q, k), dtype=torch.int64),
    )


def topk_scores(
    queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude=None, backend: str = "auto"
):
    """Top-k keys per query by dot-product score, never materialising the n_q x n_k score matrix.

    Args:
        queries: [n_q, d] float32 (float16/bfloat16/float64 accepted; scores accumulate in float32,
            float64 in the reference for float64 inputs).
        keys: [n_k, d], same dtype and device as queries; n_k < 2^32.
        k: how many keys per query (>= 1; may exceed n_k).
        exclude: keys each query must never get (e.g. its training items), as CSR: a pair
            (indptr [n_q+1], indices) of int64, a torch sparse CSR tensor or a scipy.sparse matrix.
            Ids may repeat and be unsorted within a row.
        backend: "auto", "torch", "cpp" or "triton" (see kdfast.backends()).

    Returns:
        values [n_q, k] float32, descending, and indices [n_q, k] int64. Ties go to the lower key
        index. Slots beyond the number of non-excluded keys hold index -1 and value -inf. A score
        that is not finite (NaN, or a float32 product that overflows, whose sign depends on the
        summation order) ranks as -inf (below every finite score, ties by index) and is reported
        as -inf; -0.0 equals 0.0. Every backend returns the same order for the same float32
        scores; scores themselves may differ in the last bits between backends (summation order),
        which can reorder near-ties. Each backend is bitwise deterministic run to run (cpp:
        whatever the thread count, for one CPU instruction set).
    """
    checks.floating(queries, "queries", ndim=2)
    checks.floating(keys, "keys", ndim=2)
    device = checks.same_device(queries=queries, keys=keys)
    checks.same_dim(queries, "queries", keys, "keys")
    checks.same_dtype(queries, "queries", keys, "keys")
    k = checks.positive_int(k, "k")
    n_q, n_k = queries.shape[0], keys.shape[0]
    if n_k >= 2**32:
        raise ValueError(
            f"keys must have fewer than 2^32 rows (the rank keys hold a 32-bit index), got {n_k}"
        )
    indptr, indices = as_csr(exclude, "exclude", n_q, n_k, device=device, optional=True)
    chosen = _backend.choose(backend, device.type, queries.dtype, tuple(BACKENDS))
    return _topk_op(queries, keys, k, indptr, indices, chosen)
