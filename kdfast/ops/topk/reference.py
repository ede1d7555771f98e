"""Reference top-K with exclusions (the oracle, and the "torch" backend): chunked scores, mask, topk
on the rank keys of kdfast._core.numerics (descending score, ties to the lower key index, a score
that is not finite as -inf, -0 == +0; excluded keys and empty slots come out as index -1, value
-inf). The backends rank dot products; the oracle also computes every score function of
kdfast.topk_scores directly (score_tile), which the tests compare the public function against.
"""

from __future__ import annotations

import torch

from ..._core.csr import row_ids
from ..._core.numerics import EMPTY, acc_dtype, decode_rank_keys, encode_rank_keys, inv_norms


def score_tile(q, k, score="dot", key_bias=None):
    """[n_q, n_k] scores of queries q against keys k (same dtype) by the score function: "dot"
    <q, k>, "cosine" <q, k> / (||q|| ||k||) (0 where either norm is 0), "neg_sqeuclidean"
    -||q - k||^2 (summed as squares of differences); plus key_bias[j] when given."""
    if score == "dot":
        s = q @ k.T
    elif score == "cosine":
        s = (q @ k.T) * inv_norms(q) * inv_norms(k).T
    else:
        s = -((q[:, None, :] - k[None, :, :]) ** 2).sum(-1)
    return s if key_bias is None else s + key_bias.to(s.dtype)[None, :]


def topk_scores(
    queries,
    keys,
    k,
    excl_indptr,
    excl_indices,
    *,
    score="dot",
    key_bias=None,
    max_tile=1 << 24,
):
    """Top-k keys by score per query, skipping each query's excluded keys.

    queries [n_q, d], keys [n_k, d] floating; k >= 1 (may exceed n_k); excl_indptr [n_q+1] and
    excl_indices int64 CSR (ids may repeat, any order); score and key_bias as in score_tile (the
    backend contract is "dot" without bias: the oracle alone takes the others). Scores are
    accumulated in float32 (float64 for float64 inputs) and ranked as float32. Returns values
    [n_q, k] float32 and indices [n_q, k] int64.
    Peak memory: one tile of at most max_tile scores (+ its int64 keys) besides the result (times d
    for "neg_sqeuclidean", whose oracle forms the differences).
    """
    n_q, n_k = queries.shape[0], keys.shape[0]
    dt = acc_dtype(queries.dtype)
    q_all, k_all = queries.to(dt), keys.to(dt)
    if score == "neg_sqeuclidean":
        max_tile = max(1, max_tile // max(1, queries.shape[1]))
    kb = max(1, min(n_k, max_tile))
    qb = max(1, max_tile // kb)

    def tile(q0, q1, k0, k1):
        bias = None if key_bias is None else key_bias[k0:k1]
        return score_tile(q_all[q0:q1], k_all[k0:k1], score, bias)

    keys_out = running_topk(n_q, n_k, k, excl_indptr, excl_indices, tile, qb, kb, queries.device)
    return decode_rank_keys(keys_out)


def running_topk(n_q, n_k, k, excl_indptr, excl_indices, tile, q_block, k_block, device, bar=None):
    """The rank keys [n_q, k] (int64, descending, EMPTY in empty slots) of each query's k best keys,
    from tile(q0, q1, k0, k1) -> scores [q1 - q0, k1 - k0] called over blocks of q_block queries
    and k_block keys, each query's excluded keys (CSR) masked; a running top-k per query block,
    so that memory holds one tile and the result. bar: an object with update(n_queries) or None.
    """
    out = torch.full((n_q, k), EMPTY, dtype=torch.int64, device=device)
    rows_all = row_ids(excl_indptr)
    for q0 in range(0, n_q, q_block):
        q1 = min(n_q, q0 + q_block)
        lo, hi = int(excl_indptr[q0]), int(excl_indptr[q1])
        e_rows, e_ids = rows_all[lo:hi] - q0, excl_indices[lo:hi]
        best = out[q0:q1]
        for k0 in range(0, n_k, k_block):
            k1 = min(n_k, k0 + k_block)
            s = tile(q0, q1, k0, k1)
            key = encode_rank_keys(s, torch.arange(k0, k1, device=s.device))
            sel = (e_ids >= k0) & (e_ids < k1)
            key[e_rows[sel].to(key.device), (e_ids[sel] - k0).to(key.device)] = EMPTY
            cand = torch.cat([best.to(key.device), key], dim=1)
            best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
            if best.shape[1] < k:
                pad = best.new_full((best.shape[0], k - best.shape[1]), EMPTY)
                best = torch.cat([best, pad], 1)
        out[q0:q1] = best.to(device)
        if bar is not None:
            bar.update(q1 - q0)
    return out
