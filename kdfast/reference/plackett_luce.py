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

    ranked [B, K], unranked [B, L] or None, log_tail [B] or None; -inf entries are padding. Computed in
    float32 (float64 for float64 inputs). A row with no valid ranked entry has loss 0 and gradient 0.
    """
    dt = compute_dtype(ranked)
    s = ranked.to(dt)
    valid = s > float("-inf")
    parts = [s]
    if unranked is not None:
        u = unranked.to(dt)
        u_valid = u > float("-inf")
        parts.append(u)
    big = torch.finfo(dt).max
    low = torch.stack([torch.where(p > float("-inf"), p, big).amin(1) for p in parts], 0).amin(0)
    low = torch.where(low < big, low, torch.zeros_like(low)).detach() - _GAP
    s_f = torch.where(valid, s, low[:, None])
    log_d = torch.logcumsumexp(s_f.flip(1), 1).flip(1)
    if unranked is not None:
        u_f = torch.where(u_valid, u, low[:, None])
        log_d = torch.logaddexp(log_d, torch.logsumexp(u_f, 1, keepdim=True))
    if log_tail is not None:
        log_d = torch.logaddexp(log_d, log_tail.to(dt)[:, None])
    per_row = torch.where(valid, log_d - s_f, torch.zeros_like(s_f)).sum(1)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.mean()
