"""kdfast.topk_from_scorer: each query's top-k keys under any score function given as a callable
(a teacher whose score does not factorise into embeddings, e.g. NeuMF's MLP), tile by tile.

The running top-k is the reference's (kdfast.ops.topk.reference.running_topk): int64 rank keys,
so the order rules are those of kdfast.topk_scores exactly (descending float32 score, ties to the
lower key index, a score that is not finite ranks as -inf, -0 == +0, -1 / -inf in empty slots).
"""

from __future__ import annotations

import torch

from ..._core import checks
from ..._core.csr import as_csr
from ..._core.numerics import EMPTY, decode_rank_keys
from .reference import running_topk


def _check_scores(s, n_rows, n_cols):
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"score_fn must return a torch.Tensor, got {type(s).__name__}")
    if not s.dtype.is_floating_point:
        raise TypeError(f"score_fn must return floating scores, got dtype {s.dtype}")
    if tuple(s.shape) != (n_rows, n_cols):
        raise ValueError(
            f"score_fn(query_ids, key_ids) must return scores of shape [len(query_ids), "
            f"len(key_ids)] = [{n_rows}, {n_cols}], got {tuple(s.shape)}"
        )
    return s


def topk_from_scorer(
    score_fn,
    n_queries: int,
    n_keys: int,
    k: int,
    *,
    exclude=None,
    query_ids=None,
    query_tile: int | None = None,
    key_tile: int | None = None,
    tile_elems: int = 1 << 21,
    device=None,
    progress: bool | None = None,
):
    """Top-k keys per query by scores from a callable, never holding n_q x n_k scores.

    Args:
        score_fn: score_fn(query_ids [q] int64, key_ids [n] int64) -> scores [q, n] floating (any
            device), the scores of every (query, key) pair of the two id lists. Called under
            torch.no_grad(); it is the caller's model, so it may be an MLP over the pairs.
        n_queries, n_keys: the id ranges (queries 0..n_queries-1, keys 0..n_keys-1; n_keys < 2^32).
        k: keys per query (>= 1; may exceed n_keys).
        exclude: each query's excluded keys, a CSR as in kdfast.topk_scores (rows: the queries
            ranked, i.e. len(query_ids) rows when query_ids is given).
        query_ids: int64 [q] ids to rank (default: all n_queries); row r of the result is
            query_ids[r].
        query_tile, key_tile: ids per score_fn call along each axis; by default key_tile =
            min(n_keys, 8192) and query_tile fills tile_elems scores per call.
        device: where the ids handed to score_fn and the results live (default CPU).
        progress: a progress bar over the queries (tqdm); None shows it when more than 1e9 pairs
            are scored.

    Returns (values [q, k] float32, indices [q, k] int64), as kdfast.topk_scores.
    Memory: the result, one tile of scores (+ its int64 rank keys and the running top-k of one
    query tile), plus whatever score_fn allocates for a tile.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    n_queries = checks.nonneg_int(n_queries, "n_queries")
    n_keys = checks.nonneg_int(n_keys, "n_keys")
    k = checks.positive_int(k, "k")
    tile_elems = checks.positive_int(tile_elems, "tile_elems")
    if n_keys >= 2**32:
        raise ValueError(
            f"n_keys must be below 2^32 (the rank keys hold a 32-bit index), got {n_keys}"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    if query_ids is None:
        query_ids = torch.arange(n_queries, device=device)
    else:
        query_ids = checks.integer(query_ids, "query_ids", ndim=1).to(device, torch.int64)
        checks.index_range(query_ids, "query_ids", n_queries)
    n_q = query_ids.shape[0]
    indptr, indices = as_csr(exclude, "exclude", n_q, n_keys, device=device, optional=True)
    kb = checks.positive_int(key_tile, "key_tile") if key_tile is not None else 8192
    kb = max(1, min(kb, n_keys))
    if query_tile is not None:
        qb = checks.positive_int(query_tile, "query_tile")
    else:
        qb = max(1, tile_elems // kb)
    key_ids = torch.arange(n_keys, device=device)

    def tile(q0, q1, k0, k1):
        return _check_scores(score_fn(query_ids[q0:q1], key_ids[k0:k1]), q1 - q0, k1 - k0)

    if n_q == 0 or n_keys == 0:
        keys_out = torch.full((n_q, k), EMPTY, dtype=torch.int64, device=device)
        return decode_rank_keys(keys_out)
    if progress is None:
        progress = n_q * n_keys > 1e9
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_q, desc="top-k from scorer", unit="query", leave=False)
    try:
        with torch.no_grad():
            keys_out = running_topk(n_q, n_keys, k, indptr, indices, tile, qb, kb, device, bar)
    finally:
        if bar is not None:
            bar.close()
    return decode_rank_keys(keys_out)
