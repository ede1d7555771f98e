"""Reference rank-of-ids (the oracle, and the "torch" backend): tiles of queries x keys, two passes.

Pass 1 takes each given id's score out of the score tile that holds its key, so that it is the very
number the keys are compared with; its rank key (kdfast._core.numerics: descending float32 score,
ties to the lower index, not finite as -inf, -0 == +0) is sorted per row. Pass 2 rank-encodes each
score tile (excluded keys as EMPTY, below every given id), finds with searchsorted how many of the
row's sorted given keys lie strictly below each key, and histograms that count; a given id's rank is
then the number of keys with more given keys below them than its sorted position.
"""

from __future__ import annotations

import torch

from ..._core.csr import row_ids
from ..._core.numerics import EMPTY, acc_dtype, encode_rank_keys

_TOP = 2**63 - 1  # padding ids sort last and never lie below a key


def rank_of_ids(queries, keys, ids, excl_indptr, excl_indices, max_rank=-1, *, max_tile=1 << 22):
    """Ranks [n_q, m] int64 of the key ids [n_q, m] (-1: padding -> -1) per query among its
    non-excluded keys, by dot product (accumulated in float32, float64 for float64 inputs, ranked
    as float32), at most max_rank when max_rank >= 0; the contract of kdfast.ops.rank_of_ids.
    Peak memory: one tile of at most max_tile scores (+ its int64 keys and counts) besides the
    result and an [n_q_tile, m + 1] histogram.
    """
    n_q, n_k = queries.shape[0], keys.shape[0]
    m = ids.shape[1]
    dt = acc_dtype(queries.dtype)
    q_all, k_all = queries.to(dt), keys.to(dt)
    dev = queries.device
    kb = max(1, min(n_k, max_tile))
    qb = max(1, max_tile // kb)
    out = torch.empty((n_q, m), dtype=torch.int64, device=dev)
    rows_all = row_ids(excl_indptr)
    for q0 in range(0, n_q, qb):
        q1 = min(n_q, q0 + qb)
        nb = q1 - q0
        idb = ids[q0:q1]
        valid = idb >= 0
        r_idx = torch.arange(nb, device=dev)[:, None].expand(nb, m)
        tkey = torch.full((nb, m), _TOP, dtype=torch.int64, device=dev)
        for k0 in range(0, n_k, kb):  # pass 1: the given ids' scores, from the tiles
            k1 = min(n_k, k0 + kb)
            sel = valid & (idb >= k0) & (idb < k1)
            if not bool(sel.any()):
                continue
            s = q_all[q0:q1] @ k_all[k0:k1].T
            rs, cs = r_idx[sel], idb[sel]
            tkey[sel] = encode_rank_keys(s[rs, cs - k0], cs)
        skey, order = torch.sort(tkey, dim=1)
        lo, hi = int(excl_indptr[q0]), int(excl_indptr[q1])
        e_rows, e_ids = rows_all[lo:hi] - q0, excl_indices[lo:hi]
        hist = torch.zeros((nb, m + 1), dtype=torch.int64, device=dev)
        for k0 in range(0, n_k, kb):  # pass 2: how many given keys lie below each key
            k1 = min(n_k, k0 + kb)
            s = q_all[q0:q1] @ k_all[k0:k1].T
            key = encode_rank_keys(s, torch.arange(k0, k1, device=dev))
            e = (e_ids >= k0) & (e_ids < k1)
            key[e_rows[e], e_ids[e] - k0] = EMPTY
            below = torch.searchsorted(skey, key)  # #{t : skey[t] < key}
            hist.scatter_add_(1, below, torch.ones_like(below))
        # sorted position p: the keys with more than p given keys below them
        above = hist.flip(1).cumsum(1).flip(1)[:, 1:]
        ranks = torch.empty_like(above).scatter_(1, order, above)
        if max_rank >= 0:
            ranks = ranks.clamp_max(max_rank)
        out[q0:q1] = torch.where(valid, ranks, torch.full_like(ranks, -1))
    return out


def brute_force(queries, keys, ids, excl_indptr, excl_indices):
    """The definition, written out on the dense score matrix (tests only: n_q x n_k x m memory):
    #{j not excluded, j != i : key(s_uj, j) > key(s_ui, i)}, -1 for padding."""
    dt = acc_dtype(queries.dtype)
    s = queries.to(dt) @ keys.to(dt).T
    n_q, n_k = s.shape
    key = encode_rank_keys(s, torch.arange(n_k, device=s.device))
    excluded = torch.zeros((n_q, n_k), dtype=torch.bool, device=s.device)
    excluded[row_ids(excl_indptr), excl_indices] = True
    tk = torch.gather(key, 1, ids.clamp_min(0))
    above = (key[:, None, :] > tk[:, :, None]) & ~excluded[:, None, :]
    return torch.where(ids >= 0, above.sum(-1), torch.full_like(ids, -1))
