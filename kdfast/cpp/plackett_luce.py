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


def _gather_scores(query, item, idx):
    B, M = idx.shape
    out = torch.empty((B, M), dtype=query.dtype)
    _backend.ext().pl_gather_scores(query.data_ptr(), item.data_ptr(), idx.data_ptr(), B, M, query.shape[1],
                                    query.dtype == torch.float64, out.data_ptr(), _backend.num_threads())
    return out


def emb_forward(query, item, ranked_idx, unranked_idx, log_tail, need_grad):
    """(loss [B], saved_ranked [B, K], saved_unranked [B, L] or [0], log_rest, log_inv, aux).

    For this backend saved_* are the gathered scores and aux is empty; backward reruns the score
    backward on them and scatters. Ids are int64 in [-1, N) (the op has checked).
    """
    q, e = _prep(query), _prep(item)
    r_idx = ranked_idx.to(torch.int64).contiguous()
    s = _gather_scores(q, e, r_idx)
    u = None
    if unranked_idx is not None:
        u = _gather_scores(q, e, unranked_idx.to(torch.int64).contiguous())
    t = None if log_tail is None else log_tail.to(q.dtype)
    loss, rest, inv = forward(s, u, t)
    return loss, s, (u if u is not None else s.new_empty(0)), rest, inv, s.new_empty(0)


def emb_backward(grad, query, item, ranked_idx, unranked_idx, log_tail, saved_ranked, saved_unranked,
                 log_rest, log_inv, aux):
    """(grad_query [B, d], grad_item [N, d], grad_tail [B] or [0]); deterministic."""
    q, e = _prep(query), _prep(item)
    B, d = q.shape
    N = e.shape[0]
    u = saved_unranked if unranked_idx is not None else None
    t = None if log_tail is None else log_tail.to(q.dtype)
    gs, gu, gt = backward(grad, saved_ranked, u, t, log_rest, log_inv)
    gq = torch.zeros_like(q)
    ge = torch.zeros_like(e)
    ext, nt = _backend.ext(), _backend.num_threads()
    pairs = [(gs, ranked_idx)] + ([(gu, unranked_idx)] if unranked_idx is not None else [])
    for g, idx in pairs:
        idx = idx.to(torch.int64).contiguous()
        ext.pl_gather_backward(g.data_ptr(), q.data_ptr(), e.data_ptr(), idx.data_ptr(), B, idx.shape[1], N, d,
                               q.dtype == torch.float64, gq.data_ptr(), ge.data_ptr(), nt)
    return gq, ge, gt
