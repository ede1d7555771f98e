"""Reference full-catalog log-tail (the oracle, and the "torch" backend): log of the sum of
exp(score) over every non-excluded item.

For user rows b and items j, with S_bj = clamp(<u_b, v_j>, -c, c) and a set X_b of excluded items
(a canonical CSR: the exclusions merged with the ranked / positive ids):
    log_tail_b = log sum_{j not in X_b} exp(S_bj)            (-inf when every item is excluded)
It walks the catalog in chunks of items so that at most `max_tile` scores exist at once:
    log_tail_b = logsumexp_c lse_bc,   lse_bc = log sum_{j in chunk c, j not in X_b} exp(S_bj).
The backward is the vjp of each chunk's lse (recomputed chunk by chunk, so the memory stays one
tile) against g_b * exp(lse_bc - log_tail_b), the derivative of the combination; the clamp gives a
zero gradient outside [-c, c].
"""

from __future__ import annotations

import torch

from ..._core.autodiff import vjp
from ..._core.csr import row_ids
from ..._core.numerics import acc_dtype


def _chunks(indptr, indices, n_items, chunk):
    """Yield (j0, j1, rows, local_ids) of the exclusions inside item chunk [j0, j1)."""
    rows = row_ids(indptr)
    order = torch.argsort(indices, stable=True)
    ids_sorted, rows_sorted = indices[order], rows[order]
    bounds = torch.arange(0, n_items + chunk, chunk, device=indptr.device).clamp_max(n_items)
    pos = torch.searchsorted(ids_sorted, bounds).tolist()
    for c, j0 in enumerate(range(0, n_items, chunk)):
        lo, hi = pos[c], pos[c + 1]
        yield j0, min(n_items, j0 + chunk), rows_sorted[lo:hi], ids_sorted[lo:hi] - j0


def _chunk_size(n_rows, n_items, max_tile):
    return max(1, min(n_items, max_tile // max(1, n_rows)))


def chunk_log_sum(u, v, rows, ids, clamp):
    """lse_b = log sum_j exp(clamp(<u_b, v_j>)) over the items v of one chunk, leaving out the
    entries (rows, ids); -inf (with gradient 0, never NaN) for a row with every item of the chunk
    left out."""
    s = (u @ v.T).clamp(-clamp, clamp)
    keep = torch.ones_like(s, dtype=torch.bool)
    keep[rows, ids] = False
    none = ~keep.any(1)
    s = torch.where(keep & ~none[:, None], s, torch.where(none[:, None], 0.0, float("-inf")))
    return torch.where(none, float("-inf"), torch.logsumexp(s, 1))


def log_tail(user_emb, item_emb, indptr, indices, clamp, *, max_tile=1 << 24):
    """log sum_{j not excluded} exp(clamp(<u_b, v_j>)) per row: [B] float32 (float64 for float64
    input).

    user_emb [B, d], item_emb [I, d]; (indptr [B+1], indices) int64 CSR of excluded items; clamp a
    float (inf for none). Differentiable (autograd keeps every chunk's scores: use the op for a tail
    whose gradient must fit in one tile of memory).
    """
    n_rows, n_items = user_emb.shape[0], item_emb.shape[0]
    dt = acc_dtype(user_emb.dtype)
    u, v = user_emb.to(dt), item_emb.to(dt)
    size = _chunk_size(n_rows, n_items, max_tile)
    parts = [
        chunk_log_sum(u, v[j0:j1], rows, ids, clamp)
        for j0, j1, rows, ids in _chunks(indptr, indices, n_items, size)
    ]
    if not parts:
        return torch.full((n_rows,), float("-inf"), dtype=dt, device=u.device)
    return torch.logsumexp(torch.stack(parts), 0)


def log_tail_backward(grad, lt, user_emb, item_emb, indptr, indices, clamp, *, max_tile=1 << 24):
    """(grad_user [B, d], grad_item [I, d]) in float32 (float64), for the upstream grad [B] of lt
    [B]."""
    n_rows, n_items = user_emb.shape[0], item_emb.shape[0]
    dt = acc_dtype(user_emb.dtype)
    u, v = user_emb.to(dt), item_emb.to(dt)
    g, lt = grad.to(dt), lt.to(dt)
    gu, gi = torch.zeros_like(u), torch.zeros_like(v)
    size = _chunk_size(n_rows, n_items, max_tile)
    for j0, j1, rows, ids in _chunks(indptr, indices, n_items, size):

        def part(u, v, rows=rows, ids=ids):
            return chunk_log_sum(u, v, rows, ids, clamp)

        with torch.no_grad():
            lse = part(u, v[j0:j1])
        weight = torch.where(torch.isneginf(lse), 0.0, torch.exp(lse - lt)) * g
        du, dv = vjp(part, (u, v[j0:j1]), weight, (True, True))
        gu += du
        gi[j0:j1] = dv
    return gu, gi
