"""C++ glue of the full-catalog log-tail (csrc/full_catalog.cpp): float32/float64 CPU tensors."""
from __future__ import annotations

import math

import torch

from .. import _backend


def _check(*tensors):
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"backend='cpp' takes float32 or float64 embeddings, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("backend='cpp' needs contiguous tensors")


def _clamp(clamp):
    return float(clamp) if math.isfinite(clamp) else float("inf")


def log_tail(user_emb, item_emb, indptr, indices, clamp):
    """[B] log-tail, in the input dtype; indptr/indices a canonical int64 CSR of exclusions."""
    _check(user_emb, item_emb)
    n_rows, d = user_emb.shape
    out = torch.empty(n_rows, dtype=user_emb.dtype)
    indptr, indices = indptr.contiguous(), indices.contiguous()
    _backend.ext().full_catalog_log_tail(user_emb.data_ptr(), item_emb.data_ptr(), n_rows, item_emb.shape[0], d,
                                         indptr.data_ptr(), indices.data_ptr(), _clamp(clamp), out.data_ptr(),
                                         user_emb.dtype == torch.float64, _backend.num_threads())
    return out


def log_tail_backward(grad, lt, user_emb, item_emb, indptr, indices, clamp):
    """(grad_user [B, d], grad_item [I, d]) in the input dtype."""
    _check(user_emb, item_emb)
    grad = grad.to(user_emb.dtype).contiguous()
    lt = lt.to(user_emb.dtype).contiguous()
    gu = torch.empty_like(user_emb)
    gi = torch.empty_like(item_emb)
    indptr, indices = indptr.contiguous(), indices.contiguous()
    _backend.ext().full_catalog_log_tail_backward(grad.data_ptr(), lt.data_ptr(), user_emb.data_ptr(),
                                                  item_emb.data_ptr(), user_emb.shape[0], item_emb.shape[0],
                                                  user_emb.shape[1], indptr.data_ptr(), indices.data_ptr(),
                                                  _clamp(clamp), gu.data_ptr(), gi.data_ptr(),
                                                  user_emb.dtype == torch.float64, _backend.num_threads())
    return gu, gi
