"""kdfast.topk_scores: each query's top-k keys by a score function, with per-query exclusions.

Backends (one row each in BACKENDS, the same function in each module) rank dot products:
    topk_scores(queries, keys, k, excl_indptr, excl_indices) -> (values [n_q, k] float32, indices
        int64)
with queries/keys contiguous, n_q >= 1, n_k >= 1, and the exclusions a validated int64 CSR. The
other score functions reach them as dot products of transformed vectors (_as_dot): cosine as the
dot product of unit rows, a key bias as one more column ([q, 1] . [k, b]), and the negative squared
Euclidean distance as [q, 1] . [2k, -||k||^2] (which ranks like -||q - k||^2: the two differ by
-||q||^2, a constant of the query); its values are then recomputed exactly from the differences.
"""

from __future__ import annotations

import torch

from ..._core import backend as _backend
from ..._core import checks
from ..._core.csr import as_csr, validate_csr
from ..._core.numerics import (
    EMPTY,
    acc_dtype,
    decode_rank_keys,
    encode_rank_keys,
    gather_rows,
    normalize_rows,
)
from . import cpu, reference

SCORES = ("dot", "cosine", "neg_sqeuclidean")


def _triton():
    from . import triton  # on first use: Triton reads TRITON_INTERPRET when the kernels are defined

    return triton


def _numba():
    from . import numba  # on first use: kdfast imports without numba

    return numba


BACKENDS = {"torch": lambda: reference, "cpp": lambda: cpu, "triton": _triton, "numba": _numba}


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


def _as_dot(queries, keys, score, key_bias):
    """(q, k) whose dot products rank as score(queries, keys) + key_bias; with a bias or for
    neg_sqeuclidean one column is appended and the pair is in the accumulation dtype (float32, or
    float64), so that the bias and the squared norms are not rounded to float16."""
    if score == "cosine":
        dt = acc_dtype(queries.dtype)
        queries = normalize_rows(queries.to(dt)).to(queries.dtype)
        keys = normalize_rows(keys.to(dt)).to(keys.dtype)
    if key_bias is None and score != "neg_sqeuclidean":
        return queries, keys
    dt = acc_dtype(queries.dtype)
    q, kk = queries.to(dt), keys.to(dt)
    if score == "neg_sqeuclidean":
        col = -(kk * kk).sum(1)
        kk = 2 * kk
    else:
        col = torch.zeros(kk.shape[0], dtype=dt, device=kk.device)
    if key_bias is not None:
        col = col + key_bias.to(dt)
    ones = torch.ones(q.shape[0], 1, dtype=dt, device=q.device)
    return torch.cat([q, ones], 1), torch.cat([kk, col[:, None]], 1)


def _exact_neg_sqeuclidean(queries, keys, key_bias, values, index, max_elems=1 << 24):
    """The true -||q - k_j||^2 (+ b_j) of each selected key, in the accumulation dtype from the
    differences (not the cancelling 2<q, k> - ||k||^2), then the row re-sorted by these values
    (ties to the lower index); slots -1 stay empty, a score that is not finite stays -inf."""
    dt = acc_dtype(queries.dtype)
    n_q, k = index.shape
    out = torch.empty(n_q, k, dtype=torch.float32, device=index.device)
    step = max(1, max_elems // max(1, k * queries.shape[1]))
    for r0 in range(0, n_q, step):
        idx = index[r0 : r0 + step]
        rows = gather_rows(keys, idx.clamp_min(0)).to(dt)
        d = -((queries[r0 : r0 + step, None, :].to(dt) - rows) ** 2).sum(-1)
        if key_bias is not None:
            d = d + key_bias.to(dt)[idx.clamp_min(0)]
        out[r0 : r0 + step] = d.to(torch.float32)
    # a score that ranked as not finite keeps its value (and so its -inf rank)
    scores = torch.where(torch.isfinite(values), out, values)
    rank = torch.where(index >= 0, encode_rank_keys(scores, index), torch.full_like(index, EMPTY))
    return decode_rank_keys(torch.sort(rank, dim=1, descending=True).values)


def scored_pairs(queries, keys, score, key_bias, exclude):
    """The checks every op that scores queries against keys makes (topk_scores, rank_of_ids), and
    what its backends then take: (device, q, k, (indptr, indices)) with q . k the ranking of
    `score` (_as_dot) and the exclusions as CSR (empty when exclude is None)."""
    checks.floating(queries, "queries", ndim=2)
    checks.floating(keys, "keys", ndim=2)
    device = checks.same_device(queries=queries, keys=keys)
    checks.same_dim(queries, "queries", keys, "keys")
    checks.same_dtype(queries, "queries", keys, "keys")
    score = checks.one_of(score, "score", SCORES)
    n_q, n_k = queries.shape[0], keys.shape[0]
    if key_bias is not None:
        checks.floating(key_bias, "key_bias", ndim=1)
        checks.same_device(queries=queries, key_bias=key_bias)
        if key_bias.shape[0] != n_k:
            raise ValueError(
                f"key_bias must have one value per key ({n_k}), got shape {tuple(key_bias.shape)}"
            )
    if n_k >= 2**32:
        raise ValueError(
            f"keys must have fewer than 2^32 rows (the rank keys hold a 32-bit index), got {n_k}"
        )
    csr = as_csr(exclude, "exclude", n_q, n_k, device=device, optional=True)
    q, kk = _as_dot(queries, keys, score, key_bias)
    return device, q, kk, csr


def topk_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    exclude=None,
    score: str = "dot",
    key_bias: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Top-k keys per query by a score function, never materialising the n_q x n_k score matrix.

    Args:
        queries: [n_q, d] float32 (float16/bfloat16/float64 accepted; scores accumulate in float32,
            float64 in the reference for float64 inputs).
        keys: [n_k, d], same dtype and device as queries; n_k < 2^32.
        k: how many keys per query (>= 1; may exceed n_k).
        exclude: keys each query must never get (e.g. its training items), as CSR: a pair
            (indptr [n_q+1], indices) of int64, a torch sparse CSR tensor or a scipy.sparse matrix.
            Ids may repeat and be unsorted within a row.
        score: "dot" (<q, k>, default), "cosine" (<q, k> / (||q|| ||k||), 0 for a row of norm 0;
            the norms are scale-free) or "neg_sqeuclidean" (-||q - k||^2, metric-learning
            teachers).
        key_bias: [n_k] floating or None, added to every score of its key (item biases, the
            output bias of an autoencoder's decoder).
        backend: "auto", "torch", "cpp", "triton" or "numba" (see kdfast.backends()).

    Returns:
        values [n_q, k] float32, descending, and indices [n_q, k] int64. Ties go to the lower key
        index. Slots beyond the number of non-excluded keys hold index -1 and value -inf. A score
        that is not finite (NaN, or a float32 product that overflows, whose sign depends on the
        summation order) ranks as -inf (below every finite score, ties by index) and is reported
        as -inf; -0.0 equals 0.0. Every backend returns the same order for the same float32
        scores; scores themselves may differ in the last bits between backends (summation order),
        which can reorder near-ties. Each backend is bitwise deterministic run to run (cpp:
        whatever the thread count, for one CPU instruction set).

    Cost: "cosine" without bias costs what "dot" does (plus normalised copies of both tables).
    With a key_bias, or for "neg_sqeuclidean", the backends rank [q, 1] . [k', c] in float32
    (float64 for float64 inputs): one more column (on the triton backend d + 1 rounds up to the
    next power of two: d = 64 runs as 128), and float16/bfloat16 inputs lose their tensor-core
    speed. "neg_sqeuclidean" ranks by 2<q, k> - ||k||^2, whose rounding error is about
    6e-8 (||q||^2 + ||k||^2) in float32: keys closer than that to the k-th may swap in or out
    (values are then exact: recomputed from q - k for the selected keys and the row re-sorted).
    """
    k = checks.positive_int(k, "k")
    device, q, kk, (indptr, indices) = scored_pairs(queries, keys, score, key_bias, exclude)
    chosen = _backend.choose(backend, device.type, q.dtype, tuple(BACKENDS))
    values, index = _topk_op(q, kk, k, indptr, indices, chosen)
    if score == "neg_sqeuclidean":
        return _exact_neg_sqeuclidean(queries, keys, key_bias, values, index)
    return values, index
