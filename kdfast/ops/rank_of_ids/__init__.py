"""kdfast.rank_of_ids: each query's rank of given key ids among all its non-excluded keys, in one
pass over the keys (never a queries x keys score matrix).

The rank of key i for query u is its 0-based position in u's full ranking by kdfast.topk_scores:

    rank(u, i) = #{ j not excluded for u, j != i : key(s_uj, j) > key(s_ui, i) },
    key(s, j)  = the topk_scores rank key: descending float32 score, ties to the lower key index,
                 a score that is not finite (NaN, an overflowed product) ranks as -inf, -0 == +0;

i.e. the number of non-excluded keys scored strictly higher, plus those scored equally with a lower
index. A given id that is itself excluded gets the position it would take if it were not (it is
never counted against itself); id -1 is padding and gets rank -1.

Backends (one row each in BACKENDS, the same function in each module) rank dot products:
    rank_of_ids(queries, keys, ids, excl_indptr, excl_indices, max_rank) -> ranks [n_q, m] int64
with queries/keys contiguous, n_q >= 1, n_k >= 1, ids int64 [n_q, m] in [-1, n_k), the exclusions a
validated int64 CSR, max_rank >= 0 (ranks clamped to it) or -1 (none). Every backend takes the score
of a given id from the very arithmetic that scores the keys it is compared with, so that a key never
ranks above itself and exact ties resolve by index whatever the summation order. Other score
functions reach them as dot products (kdfast.ops.topk._as_dot).
"""

from __future__ import annotations

import torch

from ..._core import backend as _backend
from ..._core import checks
from ..._core.csr import validate_csr
from ..topk import scored_pairs
from . import cpu, reference


def _triton():
    from . import triton  # on first use: Triton reads TRITON_INTERPRET when the kernels are defined

    return triton


BACKENDS = {"torch": lambda: reference, "cpp": lambda: cpu, "triton": _triton}


@torch.library.custom_op("kdfast::rank_of_ids", mutates_args=())
def _rank_op(
    queries: torch.Tensor,
    keys: torch.Tensor,
    ids: torch.Tensor,
    excl_indptr: torch.Tensor,
    excl_indices: torch.Tensor,
    max_rank: int,
    backend: str,
) -> torch.Tensor:
    n_k = keys.shape[0]
    validate_csr(excl_indptr, excl_indices, "exclude", n_k)
    checks.index_range(ids, "ids", n_k, allow_pad=True)
    if queries.shape[0] == 0 or ids.shape[1] == 0 or n_k == 0:
        return torch.full(ids.shape, -1, dtype=torch.int64, device=ids.device)
    impl = BACKENDS[backend]()
    return impl.rank_of_ids(
        queries.contiguous(),
        keys.contiguous(),
        ids.contiguous(),
        excl_indptr,
        excl_indices,
        max_rank,
    )


@_rank_op.register_fake
def _(queries, keys, ids, excl_indptr, excl_indices, max_rank, backend):
    return ids.new_empty(ids.shape, dtype=torch.int64)


def rank_of_ids(
    queries: torch.Tensor,
    keys: torch.Tensor,
    ids: torch.Tensor,
    *,
    exclude=None,
    score: str = "dot",
    key_bias: torch.Tensor | None = None,
    max_rank: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Each query's rank of the given key ids among its non-excluded keys, by a score function;
    one pass over the keys in tiles, never the n_q x n_k score matrix.

    Args:
        queries: [n_q, d] floating (float32; float16/bfloat16/float64 as in kdfast.topk_scores).
        keys: [n_k, d], same dtype and device as queries; n_k < 2^32.
        ids: [n_q, m] integer, the key ids to rank for each query (-1: padding; ids may repeat).
        exclude: keys that do not take part in a query's ranking (e.g. its training items), as CSR
            like kdfast.topk_scores' exclude: (indptr [n_q+1], indices) int64, a torch sparse CSR
            tensor or a scipy.sparse matrix; ids may repeat and be unsorted within a row.
        score, key_bias: as in kdfast.topk_scores ("dot", "cosine", "neg_sqeuclidean"; an [n_k]
            bias added to every score of its key).
        max_rank: None, or an int >= 0: ranks at or above it are reported as max_rank (a ranking
            known only to that depth, as DCD's); the cpp backend then stops counting for the ids
            known to rank that low and skips keys scored below all the others, which makes rows
            whose ids rank low cheap.
        backend: "auto", "torch", "cpp" or "triton" (see kdfast.backends()).

    Returns:
        ranks [n_q, m] int64: ranks[u, t] = the 0-based position of ids[u, t] in u's ranking by
        kdfast.topk_scores (descending float32 score, ties to the lower key index, a score that is
        not finite ranks as -inf, -0.0 == 0.0), counted over the keys not excluded for u:
            #{j not excluded, j != i : s_uj > s_ui, or s_uj == s_ui and j < i},  i = ids[u, t].
        An excluded id gets the position it would take among the non-excluded keys; -1 for a
        padding id; min(rank, max_rank) with max_rank. So for a non-excluded id, ranks[u, t] < k
        exactly when topk_scores(..., k) lists it, at that position. Not differentiable (integer
        ranks).

    Raises ValueError when ids hold an id outside [0, n_k) other than -1, or ids does not have one
    row per query; TypeError for float ids; the argument checks of kdfast.topk_scores otherwise.

    Scores: as in kdfast.topk_scores, accumulated in float32 (float64 for float64 inputs), ranked as
    float32; each backend is deterministic and self-consistent (a given id's score is computed by
    the arithmetic that scores the keys it is compared with), but backends may differ in the last
    bits of a score (summation order), which can move a rank across a near-tie. "neg_sqeuclidean"
    ranks by 2<q, k> - ||k||^2 (the form topk_scores selects by). Cost: about 2 n_q n_k d flops
    plus one comparison of each score against the query's m sorted target scores (cpp), or
    m / 16 tile passes (triton); memory O(n_q m) besides the inputs.
    """
    device, q, kk, (indptr, indices) = scored_pairs(queries, keys, score, key_bias, exclude)
    checks.integer(ids, "ids", ndim=2)
    checks.same_device(queries=queries, ids=ids)
    checks.rows_of(ids, "ids", queries.shape[0], "queries")
    cap = -1 if max_rank is None else checks.nonneg_int(max_rank, "max_rank")
    chosen = _backend.choose(backend, device.type, q.dtype, tuple(BACKENDS))
    return _rank_op(q, kk, ids.to(torch.int64), indptr, indices, cap, chosen)
