"""C++ (OpenMP) backend of the relaxed Plackett-Luce loss: buffers in, buffers out.

The functions here have the signatures the op (kdfast/ops/plackett_luce.py) dispatches to; the Triton
backend (kdfast/triton/plackett_luce.py) has the same ones. Inputs are float32 or float64 (the op has
checked), made contiguous here; nothing passed in is modified.
"""
from __future__ import annotations

import torch

from .. import _backend


def _ptr(x):
    return 0 if x is None else x.data_ptr()


def _prep(x):
    if x is None:
        return None
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend='cpp' takes float32 or float64 tensors, got {x.dtype}")
    return x.contiguous()


def forward(ranked, unranked, log_tail):
    """(loss [B], log_rest [B], log_inv [B]) in ranked's dtype; see kdfast.ops.plackett_luce."""
    s, u, t = _prep(ranked), _prep(unranked), _prep(log_tail)
    B, K = s.shape
    L = 0 if u is None else u.shape[1]
    loss, rest, inv = (torch.empty(B, dtype=s.dtype) for _ in range(3))
    _backend.ext().pl_forward(_ptr(s), _ptr(u), _ptr(t), B, K, L, s.dtype == torch.float64,
                              _ptr(loss), _ptr(rest), _ptr(inv), _backend.num_threads())
    return loss, rest, inv


def backward(grad, ranked, unranked, log_tail, log_rest, log_inv):
    """(grad_ranked [B, K], grad_unranked [B, L] or [0], grad_tail [B] or [0]), already times grad."""
    s, u, t = _prep(ranked), _prep(unranked), _prep(log_tail)
    g = grad.to(s.dtype).contiguous()
    B, K = s.shape
    L = 0 if u is None else u.shape[1]
    gs = torch.empty_like(s)
    gu = torch.empty_like(u) if u is not None else s.new_empty(0)
    gt = torch.empty_like(t) if t is not None else s.new_empty(0)
    _backend.ext().pl_backward(_ptr(g), _ptr(s), _ptr(u), _ptr(t), _ptr(log_rest.contiguous()),
                               _ptr(log_inv.contiguous()), B, K, L, s.dtype == torch.float64,
                               _ptr(gs), _ptr(gu if u is not None else None),
                               _ptr(gt if t is not None else None), _backend.num_threads())
    return gs, gu, gt


_ID_NAMES = {1: "ranked_idx", 2: "unranked_idx", 3: "rows"}


def _ids(ranked_idx, unranked_idx, rows):
    """The id tensors as contiguous int64 (unranked_idx, rows may be None), and K, L."""
    r_idx = ranked_idx.to(torch.int64).contiguous()
    u_idx = None if unranked_idx is None else unranked_idx.to(torch.int64).contiguous()
    rows_c = None if rows is None else rows.to(torch.int64).contiguous()
    return r_idx, u_idx, rows_c, r_idx.shape[1], (0 if u_idx is None else u_idx.shape[1])


def emb_forward(query, item, ranked_idx, unranked_idx, log_tail, need_grad, rows=None):
    """(loss [B], dr [B, K], du [B, L], dt [B], unused [0], gq [B, d]).

    One fused pass per row: gather the scores, evaluate the loss, and (need_grad) the row's gradient at
    grad_output = 1: score gradients dr / du, the log_tail gradient dt and the query gradient gq (empty
    tensors stand for what is absent or not needed). Ids are checked inside the kernel: ValueError
    naming the argument for an id outside [-1, N) (rows: outside [0, query rows)).
    """
    q, e = _prep(query), _prep(item)
    n_rows, d = q.shape
    N = e.shape[0]
    r_idx, u_idx, rows_c, K, L = _ids(ranked_idx, unranked_idx, rows)
    t = None if log_tail is None else log_tail.to(q.dtype).contiguous()
    B = n_rows if rows_c is None else rows_c.shape[0]
    loss = torch.empty(B, dtype=q.dtype)
    dr = torch.empty((B, K) if need_grad else 0, dtype=q.dtype)
    du = torch.empty((B, L) if need_grad and u_idx is not None else 0, dtype=q.dtype)
    dt = torch.empty(B if need_grad and t is not None else 0, dtype=q.dtype)
    gq = torch.empty((B, d) if need_grad else 0, dtype=q.dtype)
    code, value = _backend.ext().pl_emb_forward(
        q.data_ptr(), e.data_ptr(), _ptr(rows_c), r_idx.data_ptr(), _ptr(u_idx), _ptr(t), B, K, L, d, N, n_rows,
        q.dtype == torch.float64, loss.data_ptr(), _ptr(dr if need_grad else None),
        _ptr(du if du.numel() else None), _ptr(dt if dt.numel() else None), _ptr(gq if need_grad else None),
        _backend.num_threads())
    if code:
        name = _ID_NAMES[code]
        allowed = f"[0, {n_rows})" if code == 3 else f"[0, {N}) or -1 (padding)"
        raise ValueError(f"{name} holds ids outside {allowed}: found {value}")
    return loss, dr, du, dt, q.new_empty(0), gq


def emb_backward(grad, query, item, ranked_idx, unranked_idx, log_tail, dr, du, dt, unused, gq, rows=None):
    """(grad_query [n_rows, d], grad_item [N, d], grad_log_tail [n_rows] or [0]); deterministic for any
    thread count (each item row sums its entries in (row, position) order)."""
    q = _prep(query)
    n_rows, d = q.shape
    N = item.shape[0]
    g = grad.to(q.dtype).contiguous()
    r_idx, u_idx, rows_c, K, L = _ids(ranked_idx, unranked_idx, rows)
    B = g.shape[0]
    grad_q = torch.zeros_like(q)
    grad_e = torch.zeros((N, d), dtype=q.dtype)
    grad_t = torch.zeros(n_rows, dtype=q.dtype) if log_tail is not None else q.new_empty(0)
    _backend.ext().pl_emb_backward(
        g.data_ptr(), q.data_ptr(), _ptr(rows_c), r_idx.data_ptr(), _ptr(u_idx), dr.data_ptr(),
        _ptr(du if u_idx is not None else None), _ptr(dt if log_tail is not None else None), gq.data_ptr(),
        B, K, L, d, N, q.dtype == torch.float64, grad_q.data_ptr(), grad_e.data_ptr(),
        _ptr(grad_t if log_tail is not None else None), _backend.num_threads())
    return grad_q, grad_e, grad_t
