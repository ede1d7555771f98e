"""Reference relaxed Plackett-Luce (listwise) loss, in log space, with -inf padding: the oracle of
the tests and, through the backend functions at the end, the "torch" backend (whose gradients are
the oracle's own, by torch.func.vjp).

Per row b, with valid ranked scores s_1..s_K (teacher order), valid unranked scores u_1..u_L and an
optional log-mass t of the rest of the catalog:
    loss_b = -sum_{k valid} [ s_k - log( sum_{j>=k, valid} exp(s_j) + sum_l exp(u_l) + exp(t) ) ]
"""

from __future__ import annotations

import torch

from ..._core.autodiff import value_and_grads, vjp
from ..._core.numerics import acc_dtype, gather_rows, reduce_rows
from .rows import add_rows, check_ids, take_rows

# Padding is replaced by (smallest valid score in the row - _GAP): exp(-_GAP) is exactly 0 in
# float32 and float64, so padded entries add nothing, and no -inf - -inf (NaN) reaches autograd.
_GAP = 1000.0


def plackett_luce_loss(ranked, unranked=None, log_tail=None, reduction="sum"):
    """The loss per row ("none"), summed ("sum") or averaged over rows ("mean"); differentiable.

    ranked [B, K], unranked [B, L] or None, log_tail [B] or None; -inf entries are padding (NaN is
    not padding: it propagates). Computed in float32 (float64 for float64 inputs). A row with no
    valid ranked entry has loss 0 and gradient 0.
    """
    dt = acc_dtype(ranked.dtype)
    s = ranked.to(dt)
    if s.shape[1] == 0:
        return reduce_rows(s.sum(1), reduction)
    valid = ~torch.isneginf(s)
    parts = [s] if unranked is None or unranked.shape[1] == 0 else [s, unranked.to(dt)]
    big = torch.finfo(dt).max
    low = torch.stack([torch.where(torch.isneginf(p), big, p).amin(1) for p in parts], 0).amin(0)
    low = torch.where(low < big, low, torch.zeros_like(low)).detach() - _GAP
    s_f = torch.where(valid, s, low[:, None])
    log_d = torch.logcumsumexp(s_f.flip(1), 1).flip(1)
    if len(parts) > 1:
        u = parts[1]
        u_f = torch.where(torch.isneginf(u), low[:, None], u)
        log_d = torch.logaddexp(log_d, torch.logsumexp(u_f, 1, keepdim=True))
    if log_tail is not None:
        log_d = torch.logaddexp(log_d, log_tail.to(dt)[:, None])
    per_row = torch.where(valid, log_d - s_f, torch.zeros_like(s_f)).sum(1)
    return reduce_rows(per_row, reduction)


def gather_scores(query, item, idx):
    """scores[b, j] = <query_b, item[idx[b, j]]>, -inf where idx is -1 (materialises [B, M, d])."""
    dt = acc_dtype(query.dtype)
    rows = gather_rows(item.to(dt), idx.clamp_min(0))  # (not item[idx]: reproducible gradients)
    s = torch.einsum("bmd,bd->bm", rows, query.to(dt))
    return torch.where(idx < 0, torch.full_like(s, float("-inf")), s)


def plackett_luce_loss_from_embeddings(
    query_emb, item_emb, ranked_idx, unranked_idx=None, log_tail=None, reduction="sum"
):
    """The loss on scores gathered from embeddings: the obvious gather + dot + plackett_luce_loss.

    query_emb [B, d], item_emb [N, d], ranked_idx [B, K] and unranked_idx [B, L] int64 ids (-1
    padding).
    """
    s = gather_scores(query_emb, item_emb, ranked_idx)
    u = None if unranked_idx is None else gather_scores(query_emb, item_emb, unranked_idx)
    return plackett_luce_loss(s, u, log_tail, reduction)


# ------------------------------------------------------------------------------ the torch backend
def _rows_loss(ranked, unranked, log_tail):
    return plackett_luce_loss(ranked, unranked, log_tail, "none")


def _upcast(x, dt):
    return None if x is None else x.to(dt)


def loss_and_grads(ranked, unranked, log_tail, need_grad):
    """Backend contract (see kdfast.ops.plackett_luce): per-row loss and unit-upstream gradients."""
    dt = acc_dtype(ranked.dtype)
    inputs = (ranked.to(dt), _upcast(unranked, dt), _upcast(log_tail, dt))
    loss, grads = value_and_grads(_rows_loss, inputs, (need_grad,) * 3)
    return (loss, *grads)


def emb_forward(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad):
    """Backend contract of the embedding form: loss and unit-upstream gradients (see the op)."""
    check_ids(ranked_idx, unranked_idx, rows, item.shape[0], query.shape[0])
    q, r, u, t = take_rows(rows, query, ranked_idx, unranked_idx, log_tail)
    dt = acc_dtype(query.dtype)
    s0 = torch.zeros(r.shape, dtype=dt, device=q.device)
    u0 = None if u is None else torch.zeros(u.shape, dtype=dt, device=q.device)

    def loss(q, s_shift, u_shift, t):  # the shifts are 0: their gradients are the score gradients
        s = gather_scores(q, item, r) + s_shift
        us = None if u is None else gather_scores(q, item, u) + u_shift
        return _rows_loss(s, us, t)

    value, (gq, d_r, d_u, d_t) = value_and_grads(
        loss, (q.to(dt), s0, u0, _upcast(t, dt)), (need_grad,) * 4
    )
    return value, d_r, d_u, d_t, gq


def emb_backward(
    grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked, grad_query
):
    """Backend contract: (grad_query [n_rows, d], grad_item [N, d]) for the upstream grad [B]."""
    q, r, u = take_rows(rows, query, ranked_idx, unranked_idx)
    g = grad.to(grad_query.dtype)[:, None]
    item_acc = item.to(grad_query.dtype)
    (grad_item,) = vjp(lambda e: gather_scores(q, e, r), (item_acc,), g * d_ranked, (True,))
    if u is not None:
        (more,) = vjp(lambda e: gather_scores(q, e, u), (item_acc,), g * d_unranked, (True,))
        grad_item = grad_item + more
    return add_rows(g * grad_query, rows, query.shape[0]), grad_item
