"""C++ (OpenMP) backend of the full-catalog log-tail (csrc/full_catalog.cpp), with the signatures of
the op's backend contract (kdfast.ops.full_catalog): float32/float64 CPU tensors, results in that
dtype."""

from __future__ import annotations

import torch

from ..._core import backend


def log_tail(user_emb, item_emb, indptr, indices, clamp):
    """[B] log-tail; indptr/indices a canonical int64 CSR of exclusions, clamp a float (inf:
    none)."""
    n_rows, d = user_emb.shape
    out = torch.empty(n_rows, dtype=user_emb.dtype)
    backend.require_ext().full_catalog_log_tail(
        user_emb.data_ptr(),
        item_emb.data_ptr(),
        n_rows,
        item_emb.shape[0],
        d,
        indptr.data_ptr(),
        indices.data_ptr(),
        float(clamp),
        out.data_ptr(),
        user_emb.dtype == torch.float64,
        backend.num_threads(),
    )
    return out


def log_tail_backward(grad, lt, user_emb, item_emb, indptr, indices, clamp):
    """(grad_user [B, d], grad_item [I, d]) for the upstream grad [B] of the log-tail lt [B]."""
    grad = grad.to(user_emb.dtype).contiguous()
    lt = lt.to(user_emb.dtype).contiguous()
    gu, gi = torch.empty_like(user_emb), torch.empty_like(item_emb)
    backend.require_ext().full_catalog_log_tail_backward(
        grad.data_ptr(),
        lt.data_ptr(),
        user_emb.data_ptr(),
        item_emb.data_ptr(),
        user_emb.shape[0],
        item_emb.shape[0],
        user_emb.shape[1],
        indptr.data_ptr(),
        indices.data_ptr(),
        float(clamp),
        gu.data_ptr(),
        gi.data_ptr(),
        user_emb.dtype == torch.float64,
        backend.num_threads(),
    )
    return gu, gi
