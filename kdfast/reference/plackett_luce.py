"""Reference relaxed Plackett-Luce (listwise) loss, in log space, with -inf padding.

Per row b, with valid ranked scores s_1..s_K (teacher order), valid unranked scores u_1..u_L and an
optional log-mass t of the rest of the catalog:
    loss_b = -sum_{k valid} [ s_k - log( sum_{j>=k, valid} exp(s_j) + sum_l exp(u_l) + exp(t) ) ]
"""
from __future__ import annotations

import torch

# Padding is replaced by (smallest valid score in the row - _GAP): exp(-_GAP) is exactly 0 in float32
# and float64, so padded entries add nothing, and no -inf - -inf (NaN) reaches autograd.
_GAP = 1000.0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def plackett_luce_loss(ranked, unranked=None, log_tail=None, reduction="sum"):
    """The loss per row ("none"), summed ("sum") or averaged over rows ("mean"); differentiable.

    ranked [B, K], unranked [B, L] or None, log_tail [B] or None; -inf entries are padding (NaN is not
    padding: it propagates). Computed in float32 (float64 for float64 inputs). A row with no valid
    ranked entry has loss 0 and gradient 0.
    """
    dt = compute_dtype(ranked)
    s = ranked.to(dt)
    valid = ~torch.isneginf(s)
    parts = [s]
    if unranked is not None:
        u = unranked.to(dt)
        u_valid = ~torch.isneginf(u)
        parts.append(u)
    big = torch.finfo(dt).max
    if s.shape[1] == 0:
        return reduce_rows(s.sum(1), reduction)
    parts = [p for p in parts if p.shape[1] > 0]
    low = torch.stack([torch.where(torch.isneginf(p), big, p).amin(1) for p in parts], 0).amin(0)
    low = torch.where(low < big, low, torch.zeros_like(low)).detach() - _GAP
    s_f = torch.where(valid, s, low[:, None])
    log_d = torch.logcumsumexp(s_f.flip(1), 1).flip(1)
    if unranked is not None:
        u_f = torch.where(u_valid, u, low[:, None])
        log_d = torch.logaddexp(log_d, torch.logsumexp(u_f, 1, keepdim=True))
    if log_tail is not None:
        log_d = torch.logaddexp(log_d, log_tail.to(dt)[:, None])
    per_row = torch.where(valid, log_d - s_f, torch.zeros_like(s_f)).sum(1)
    return reduce_rows(per_row, reduction)


def reduce_rows(per_row, reduction):
    """Per-row losses reduced as reduction says: "none" (as they are), "sum", or "mean" over rows."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.mean()


def gather_scores(query, item, idx):
    """scores[b, j] = <query_b, item[idx[b, j]]>, -inf where idx is -1 (materialises [B, M, d])."""
    dt = compute_dtype(query)
    rows = item.to(dt)[idx.clamp_min(0)]
    s = torch.einsum("bmd,bd->bm", rows, query.to(dt))
    return torch.where(idx < 0, torch.full_like(s, float("-inf")), s)


def plackett_luce_loss_from_embeddings(query_emb, item_emb, ranked_idx, unranked_idx=None, log_tail=None,
                                       reduction="sum"):
    """The loss on scores gathered from embeddings: the obvious gather + dot + plackett_luce_loss.

    query_emb [B, d], item_emb [N, d], ranked_idx [B, K] and unranked_idx [B, L] int64 ids (-1 padding).
    """
    s = gather_scores(query_emb, item_emb, ranked_idx)
    u = None if unranked_idx is None else gather_scores(query_emb, item_emb, unranked_idx)
    return plackett_luce_loss(s, u, log_tail, reduction)
