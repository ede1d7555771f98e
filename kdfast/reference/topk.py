"""Reference top-K of dot-product scores with exclusions: chunked matmul, mask, topk.

The order every backend reproduces exactly: descending score, ties to the LOWER key index; NaN scores
rank as -inf; -0.0 equals +0.0. It is implemented by one total order on int64 "rank keys":
    key = ordered(score) * 2^32 + (2^32 - 1 - index)
where ordered() maps float32 bits to an int32 that sorts like the float. Keys are unique per row, so
an int64 top-k on them is exact and deterministic. Excluded keys and empty slots take the key
EMPTY = -2^63 and come out as index -1, value -inf.
"""
from __future__ import annotations

import torch

EMPTY = -(2**63)
_LOW = (1 << 32) - 1


def score_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def encode(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rank keys (int64) of float32 scores at the given int64 key indices (broadcastable)."""
    s = scores.to(torch.float32)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s) + 0.0  # NaN -> -inf, -0 -> +0
    b = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return ordered * (1 << 32) + (_LOW - index)


def decode(keys: torch.Tensor):
    """(values float32, indices int64) of rank keys; EMPTY gives (-inf, -1)."""
    empty = keys == EMPTY
    low = keys & _LOW
    index = _LOW - low
    ordered = torch.div(keys - low, 1 << 32, rounding_mode="floor")
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(torch.int32)
    # torch.where rather than masked assignment: inductor cannot re-index an in-place write into a
    # dtype view, and torch.compile of this reference is one of the benchmark baselines.
    values = torch.where(empty, float("-inf"), bits.view(torch.float32))
    return values, torch.where(empty, -1, index)


def topk_scores(queries, keys, k, excl_indptr, excl_indices, *, max_tile=1 << 24):
    """Top-k keys by <query, key> per query, skipping each query's excluded keys.

    queries [n_q, d], keys [n_k, d] floating; k >= 1 (may exceed n_k); excl_indptr [n_q+1] and
    excl_indices int64 CSR (ids may repeat, any order). Scores are accumulated in float32 (float64 for
    float64 inputs) and ranked as float32. Returns values [n_q, k] float32 and indices [n_q, k] int64.
    Peak memory: one tile of at most max_tile scores (+ its int64 keys) besides the result.
    """
    n_q, n_k = queries.shape[0], keys.shape[0]
    dev = queries.device
    dt = score_dtype(queries)
    q_all, k_all = queries.to(dt), keys.to(dt)
    kb = max(1, min(n_k, max_tile))
    qb = max(1, max_tile // kb)
    out = torch.full((n_q, k), EMPTY, dtype=torch.int64, device=dev)
    rows_all = torch.repeat_interleave(torch.arange(n_q, device=dev), excl_indptr[1:] - excl_indptr[:-1])
    for q0 in range(0, n_q, qb):
        q1 = min(n_q, q0 + qb)
        lo, hi = int(excl_indptr[q0]), int(excl_indptr[q1])
        e_rows, e_ids = rows_all[lo:hi] - q0, excl_indices[lo:hi]
        best = out[q0:q1]
        for k0 in range(0, n_k, kb):
            k1 = min(n_k, k0 + kb)
            s = q_all[q0:q1] @ k_all[k0:k1].T
            key = encode(s, torch.arange(k0, k1, device=dev))
            sel = (e_ids >= k0) & (e_ids < k1)
            key[e_rows[sel], e_ids[sel] - k0] = EMPTY
            cand = torch.cat([best, key], dim=1)
            best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
            if best.shape[1] < k:
                best = torch.cat([best, best.new_full((best.shape[0], k - best.shape[1]), EMPTY)], 1)
        out[q0:q1] = best
    return decode(out)
