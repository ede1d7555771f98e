"""C++ (OpenMP) backend of the relaxed Plackett-Luce loss (csrc/plackett_luce*.cpp): buffers in,
buffers out, with the signatures of the op's backend contract (kdfast.ops.plackett_luce). Inputs are
float32 or float64 CPU tensors; results come in the same dtype; nothing passed in is modified.
"""

from __future__ import annotations

import torch

from ..._core import backend


def _ptr(x):
    """A tensor's data pointer; 0 (what the kernels read as "absent") for None or an empty
    tensor."""
    return 0 if x is None or x.numel() == 0 else x.data_ptr()


def _contiguous(x):
    return None if x is None else x.contiguous()


def loss_and_grads(ranked, unranked, log_tail, need_grad):
    """(loss [B], d_ranked [B, K], d_unranked [B, L], d_tail [B]); the last three at unit upstream
    gradient, empty [0] when absent or not needed. The forward kernel, then (need_grad) the backward
    kernel with grad_output 1."""
    s, u, t = ranked.contiguous(), _contiguous(unranked), _contiguous(log_tail)
    B, K = s.shape
    L = 0 if u is None else u.shape[1]
    f64 = s.dtype == torch.float64
    ext, threads = backend.require_ext(), backend.num_threads()
    loss, rest, inv = (torch.empty(B, dtype=s.dtype) for _ in range(3))
    ext.pl_forward(
        _ptr(s), _ptr(u), _ptr(t), B, K, L, f64, _ptr(loss), _ptr(rest), _ptr(inv), threads
    )
    if not need_grad:
        return loss, s.new_empty(0), s.new_empty(0), s.new_empty(0)
    d_r = torch.empty_like(s)
    d_u = torch.empty_like(u) if u is not None else s.new_empty(0)
    d_t = torch.empty_like(t) if t is not None else s.new_empty(0)
    ones = torch.ones(B, dtype=s.dtype)
    ext.pl_backward(
        _ptr(ones),
        _ptr(s),
        _ptr(u),
        _ptr(t),
        _ptr(rest),
        _ptr(inv),
        B,
        K,
        L,
        f64,
        _ptr(d_r),
        _ptr(d_u),
        _ptr(d_t),
        threads,
    )
    return loss, d_r, d_u, d_t


def _ids(ranked_idx, unranked_idx, rows):
    """The id tensors as contiguous int64 (unranked_idx and rows may be None)."""
    r = ranked_idx.to(torch.int64).contiguous()
    u = None if unranked_idx is None else unranked_idx.to(torch.int64).contiguous()
    return r, u, None if rows is None else rows.to(torch.int64).contiguous()


def emb_forward(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad):
    """(loss [B], d_ranked [B, K], d_unranked [B, L], d_tail [B], grad_query [B, d]).

    One fused pass per row: gather the scores, evaluate the loss and (need_grad) the row's gradients
    at unit upstream gradient (empty tensors stand for what is absent or not needed). The kernel
    checks the ids as it reads them: ValueError naming the argument for an id outside [-1, N)
    (rows: outside [0, query rows)).
    """
    q, e = query.contiguous(), item.contiguous()
    n_rows, d = q.shape
    r, u, rows = _ids(ranked_idx, unranked_idx, rows)
    t = _contiguous(log_tail)
    B = n_rows if rows is None else rows.shape[0]
    K, L = r.shape[1], 0 if u is None else u.shape[1]

    def out(*shape, wanted=True):
        return torch.empty(shape if need_grad and wanted else 0, dtype=q.dtype)

    loss, gq = torch.empty(B, dtype=q.dtype), out(B, d)
    d_r, d_u, d_t = out(B, K), out(B, L, wanted=u is not None), out(B, wanted=t is not None)
    backend.require_ext().pl_emb_forward(
        q.data_ptr(),
        e.data_ptr(),
        _ptr(rows),
        r.data_ptr(),
        _ptr(u),
        _ptr(t),
        B,
        K,
        L,
        d,
        e.shape[0],
        n_rows,
        q.dtype == torch.float64,
        loss.data_ptr(),
        _ptr(d_r),
        _ptr(d_u),
        _ptr(d_t),
        _ptr(gq),
        backend.num_threads(),
    )
    return loss, d_r, d_u, d_t, gq


def emb_backward(
    grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked, grad_query
):
    """(grad_query [n_rows, d], grad_item [N, d]): the saved row gradients times grad, scattered.
    Deterministic for any thread count (each item row sums its entries in (row, position) order)."""
    q = query.contiguous()
    n_rows, d = q.shape
    N = item.shape[0]
    g = grad.to(q.dtype).contiguous()
    r, u, rows = _ids(ranked_idx, unranked_idx, rows)
    B, K, L = g.shape[0], r.shape[1], 0 if u is None else u.shape[1]
    grad_q = torch.zeros_like(q)
    grad_e = torch.zeros((N, d), dtype=q.dtype)
    backend.require_ext().pl_emb_backward(
        g.data_ptr(),
        q.data_ptr(),
        _ptr(rows),
        r.data_ptr(),
        _ptr(u),
        d_ranked.data_ptr(),
        _ptr(d_unranked),
        0,
        grad_query.data_ptr(),
        B,
        K,
        L,
        d,
        N,
        q.dtype == torch.float64,
        grad_q.data_ptr(),
        grad_e.data_ptr(),
        0,
        backend.num_threads(),
    )
    return grad_q, grad_e
