"""Reference full-catalog log-tail: log of the sum of exp(score) over every non-excluded item.

For user rows b and items j, with S_bj = clamp(<u_b, v_j>, -c, c) and a set X_b of excluded items
(the exclusion CSR merged with the ranked / positive ids, canonical: sorted, no repeats):
    log_tail_b = log sum_{j not in X_b} exp(S_bj)            (-inf when every item is excluded)
Backward, for an upstream gradient g_b:
    G_bj = g_b exp(S_bj - log_tail_b) [j not in X_b] [-c <= <u_b, v_j> <= c]
    grad_user = G @ item_emb,  grad_item = G^T @ user_emb
Both passes walk the catalog in chunks of items so that at most `max_tile` scores exist at once; the
forward combines chunks with a running maximum (log space).
"""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(indptr, indices, n_rows, n_items, chunk):
    """Yield (j0, j1, rows, local_ids) of the exclusions inside item chunk [j0, j1)."""
    counts = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n_rows, device=indptr.device), counts)
    order = torch.argsort(indices, stable=True)
    ids_sorted, rows_sorted = indices[order], rows[order]
    bounds = torch.arange(0, n_items + chunk, chunk, device=indptr.device).clamp_max(n_items)
    pos = torch.searchsorted(ids_sorted, bounds).tolist()
    for c, j0 in enumerate(range(0, n_items, chunk)):
        lo, hi = pos[c], pos[c + 1]
        yield j0, min(n_items, j0 + chunk), rows_sorted[lo:hi], ids_sorted[lo:hi] - j0


def _chunk_size(n_rows, n_items, max_tile):
    return max(1, min(n_items, max_tile // max(1, n_rows)))


def _scores(u, v, clamp):
    raw = u @ v.T
    return raw, raw.clamp(-clamp, clamp)


def log_tail(user_emb, item_emb, indptr, indices, clamp, *, max_tile=1 << 24):
    """log sum_{j not excluded} exp(clamp(<u_b, v_j>)) per row: [B] float32 (float64 for float64 input).

    user_emb [B, d], item_emb [I, d]; (indptr [B+1], indices) canonical int64 CSR of excluded items;
    clamp a float (inf for none).
    """
    n_rows, n_items = user_emb.shape[0], item_emb.shape[0]
    dt = compute_dtype(user_emb)
    u, v = user_emb.to(dt), item_emb.to(dt)
    m = torch.full((n_rows,), float("-inf"), dtype=dt, device=u.device)
    s = torch.zeros(n_rows, dtype=dt, device=u.device)
    for j0, j1, rows, ids in _chunks(indptr, indices, n_rows, n_items, _chunk_size(n_rows, n_items, max_tile)):
        _, sc = _scores(u, v[j0:j1], clamp)
        sc[rows, ids] = float("-inf")
        new_m = torch.maximum(m, sc.amax(1))
        safe = torch.where(torch.isinf(new_m) & (new_m < 0), torch.zeros_like(new_m), new_m)
        s = s * torch.exp(m - safe) + torch.exp(sc - safe[:, None]).sum(1)
        m = new_m
    return torch.log(s) + torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def log_tail_backward(grad, lt, user_emb, item_emb, indptr, indices, clamp, *, max_tile=1 << 24):
    """(grad_user [B, d], grad_item [I, d]) in the input dtype, for upstream grad [B] of log_tail lt [B]."""
    n_rows, n_items = user_emb.shape[0], item_emb.shape[0]
    dt = compute_dtype(user_emb)
    u, v = user_emb.to(dt), item_emb.to(dt)
    g, lt = grad.to(dt), lt.to(dt)
    gu = torch.zeros_like(u)
    gi = torch.zeros_like(v)
    for j0, j1, rows, ids in _chunks(indptr, indices, n_rows, n_items, _chunk_size(n_rows, n_items, max_tile)):
        raw, sc = _scores(u, v[j0:j1], clamp)
        keep = (raw >= -clamp) & (raw <= clamp)
        keep[rows, ids] = False
        p = torch.where(keep, torch.exp(sc - lt[:, None]) * g[:, None], torch.zeros_like(sc))
        gu += p @ v[j0:j1]
        gi[j0:j1] = p.T @ u
    return gu.to(user_emb.dtype), gi.to(item_emb.dtype)
