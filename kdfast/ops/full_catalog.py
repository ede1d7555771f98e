"""kdfast.full_catalog_listwise_loss / full_catalog_set_loss: listwise and set-level losses whose tail is
the whole catalog (no-sampling RRD, HetComp), without materialising the B x I score matrix.

Both losses are built on one fused op, the per-row log-tail
    log_tail_b = log sum_{j in T_b} exp(S_bj),   S_bj = clamp(<u_b, v_j>, -c, c),
    T_b = every item that is neither in the exclusion CSR row b nor among the row's skip ids
(the ranked / positive ids and any extra ids), registered as the torch.library custom op
kdfast::full_catalog_log_tail with its own backward op. The few ranked/positive scores are ordinary
differentiable gathers; the Plackett-Luce part goes through kdfast.plackett_luce_loss.
"""
from __future__ import annotations

import importlib
import math

import torch

from .. import _backend, _checks
from ..csr import as_csr, canonicalize, row_ids, validate_csr
from ..reference.plackett_luce import reduce_rows



def _merged_exclusions(excl_indptr, excl_indices, skip_idx, n_items):
    """One canonical CSR (sorted ids, no repeats) of the exclusion rows plus the non-padding skip ids."""
    n_rows = excl_indptr.numel() - 1
    rows = row_ids(excl_indptr)
    ids = excl_indices
    if skip_idx.numel():
        valid = skip_idx >= 0
        s_rows = torch.arange(n_rows, device=skip_idx.device)[:, None].expand_as(skip_idx)[valid]
        rows, ids = torch.cat([rows, s_rows]), torch.cat([ids, skip_idx[valid]])
    counts = torch.bincount(rows, minlength=n_rows)
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=excl_indptr.device)
    indptr[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(rows, stable=True)
    return canonicalize(indptr, ids[order], n_items)


def _module(backend):
    return importlib.import_module(f"kdfast.{'reference' if backend == 'torch' else backend}.full_catalog")


def _out_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("kdfast::full_catalog_log_tail", mutates_args=())
def _log_tail_op(user_emb: torch.Tensor, item_emb: torch.Tensor, skip_idx: torch.Tensor,
                 excl_indptr: torch.Tensor, excl_indices: torch.Tensor, clamp: float,
                 backend: str) -> torch.Tensor:
    n_items = item_emb.shape[0]
    validate_csr(excl_indptr, excl_indices, "exclude", n_items)
    _checks.index_range(skip_idx, "ranked/positive/skip ids", n_items, allow_pad=True)
    if user_emb.shape[0] == 0:
        return user_emb.new_empty((0,), dtype=_out_dtype(user_emb))
    indptr, indices = _merged_exclusions(excl_indptr, excl_indices, skip_idx, n_items)
    return _module(backend).log_tail(user_emb.contiguous(), item_emb.contiguous(), indptr, indices, clamp)


@_log_tail_op.register_fake
def _(user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend):
    return user_emb.new_empty((user_emb.shape[0],), dtype=_out_dtype(user_emb))


@torch.library.custom_op("kdfast::full_catalog_log_tail_backward", mutates_args=())
def _log_tail_bwd_op(grad: torch.Tensor, log_tail: torch.Tensor, user_emb: torch.Tensor,
                     item_emb: torch.Tensor, skip_idx: torch.Tensor, excl_indptr: torch.Tensor,
                     excl_indices: torch.Tensor, clamp: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if user_emb.shape[0] == 0:
        return torch.zeros_like(user_emb), torch.zeros_like(item_emb)
    indptr, indices = _merged_exclusions(excl_indptr, excl_indices, skip_idx, item_emb.shape[0])
    return _module(backend).log_tail_backward(grad.contiguous(), log_tail.contiguous(), user_emb.contiguous(),
                                              item_emb.contiguous(), indptr, indices, clamp)


@_log_tail_bwd_op.register_fake
def _(grad, log_tail, user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend):
    return torch.empty_like(user_emb), torch.empty_like(item_emb)


def _setup_context(ctx, inputs, output):
    user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend = inputs
    ctx.save_for_backward(output, user_emb, item_emb, skip_idx, excl_indptr, excl_indices)
    ctx.clamp, ctx.backend = clamp, backend


def _backward(ctx, grad):
    lt, user_emb, item_emb, skip_idx, excl_indptr, excl_indices = ctx.saved_tensors
    gu, gi = _log_tail_bwd_op(grad, lt, user_emb, item_emb, skip_idx, excl_indptr, excl_indices,
                              ctx.clamp, ctx.backend)
    return gu, gi, None, None, None, None, None


_log_tail_op.register_autograd(_backward, setup_context=_setup_context)


def _prepare(user_emb, item_emb, idx, idx_name, exclude, clamp, reduction, backend):
    _checks.floating(user_emb, "user_emb", ndim=2)
    _checks.floating(item_emb, "item_emb", ndim=2)
    _checks.integer(idx, idx_name, ndim=2)
    device = _checks.same_device(user_emb=user_emb, item_emb=item_emb, **{idx_name: idx})
    if user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"user_emb and item_emb must have the same dimension d, got {user_emb.shape[1]} and {item_emb.shape[1]}")
    if user_emb.dtype != item_emb.dtype:
        raise TypeError(f"user_emb and item_emb must have the same dtype, got {user_emb.dtype} and {item_emb.dtype}")
    if idx.shape[0] != user_emb.shape[0]:
        raise ValueError(f"{idx_name} must have one row per user_emb row ({user_emb.shape[0]}), got shape {tuple(idx.shape)}")
    if item_emb.shape[0] == 0:
        raise ValueError("item_emb must hold at least one item")
    if clamp is None:
        clamp = math.inf
    else:
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0:
            raise ValueError(f"clamp must be a positive number or None, got {clamp!r}")
        clamp = float(clamp)
    _checks.reduction(reduction)
    n_rows, n_items = user_emb.shape[0], item_emb.shape[0]
    indptr, indices = as_csr(exclude, "exclude", n_rows, n_items, device=device, optional=True)
    chosen = _backend.resolve(backend, device)
    if chosen == "cpp" and user_emb.dtype in (torch.float16, torch.bfloat16):
        raise TypeError("backend='cpp' takes float32 or float64 embeddings; float16/bfloat16 are GPU dtypes")
    return clamp, indptr, indices, chosen


def _gathered_scores(user_emb, item_emb, idx, clamp):
    """clamp(<u_b, v_idx[b,k]>) with -inf where idx is -1 (padding); float32 (float64 for float64)."""
    dt = _out_dtype(user_emb)
    valid = idx >= 0
    s = torch.einsum("bd,bkd->bk", user_emb.to(dt), item_emb[idx.clamp_min(0)].to(dt))
    if clamp != math.inf:
        s = s.clamp(-clamp, clamp)
    return torch.where(valid, s, torch.full_like(s, float("-inf"))), valid


def full_catalog_log_tail(user_emb, item_emb, skip_idx=None, *, exclude=None, clamp=None, backend="auto"):
    """Per row, log sum of exp(clamp(<u_b, v_j>)) over every item j neither in exclude row b nor in
    skip_idx[b] (the fused op both losses use; differentiable in user_emb and item_emb).

    Args: user_emb [B, d], item_emb [I, d] floating, same dtype; skip_idx [B, M] int64 or None (-1 is
    padding; repeats allowed); exclude CSR with B rows (see kdfast.as_csr) or None; clamp float > 0 or
    None; backend "auto" | "torch" | "cpp" | "triton". Returns [B] float32 (float64 for float64 inputs); -inf for
    a row whose items are all excluded.
    """
    if skip_idx is None:
        skip_idx = torch.full((user_emb.shape[0] if isinstance(user_emb, torch.Tensor) else 0, 0), -1,
                              dtype=torch.int64, device=getattr(user_emb, "device", None))
    clamp, indptr, indices, chosen = _prepare(user_emb, item_emb, skip_idx, "skip_idx", exclude, clamp, "sum", backend)
    return _log_tail_op(user_emb, item_emb, skip_idx.to(torch.int64), indptr, indices, clamp, chosen)


def full_catalog_listwise_loss(user_emb, item_emb, ranked_idx, *, exclude=None, clamp=None, reduction="sum",
                               backend="auto"):
    """Relaxed Plackett-Luce loss of a ranked list against the whole rest of the catalog (RRD without
    sampling; HetComp's ListMLE with a catalog tail), never materialising the B x I scores.

    Args:
        user_emb: [B, d] float32 (float64, and float16/bfloat16 on GPU, accepted): the batch's users.
        item_emb: [I, d], same dtype and device: every item.
        ranked_idx: [B, K] int64 item ids in teacher order; -1 is padding (anywhere in the row).
        exclude: CSR with B rows (e.g. each user's training items; repeats allowed) or None.
        clamp: c > 0 clamps every score to [-c, c] with zero gradient outside (HetComp uses 40); None.
        reduction: "sum" (default, as every lambda in docs/METHODS.md assumes), "mean" over rows, or "none" ([B]).
        backend: "auto", "torch", "cpp" or "triton" (see kdfast.backends()).

    Math, per row with ranked scores s_1..s_K (valid entries only) and tail T_b = items neither excluded
    nor ranked:
        L_b = -sum_k [ s_k - log( sum_{j>=k} exp(s_j) + sum_{t in T_b} exp(S_bt) ) ]
    A row with no valid ranked id has loss 0 and gradient 0. The tail's log-sum is the fused op
    kdfast::full_catalog_log_tail; deterministic on every backend.
    """
    from .plackett_luce import plackett_luce_loss
    clamp, indptr, indices, chosen = _prepare(user_emb, item_emb, ranked_idx, "ranked_idx", exclude, clamp,
                                              reduction, backend)
    ranked_idx = ranked_idx.to(torch.int64)
    lt = _log_tail_op(user_emb, item_emb, ranked_idx, indptr, indices, clamp, chosen)
    s, _ = _gathered_scores(user_emb, item_emb, ranked_idx, clamp)
    per_row = plackett_luce_loss(s, None, log_tail=lt, reduction="none",
                                 backend="torch" if chosen == "torch" else "auto")
    return reduce_rows(per_row, reduction)


def full_catalog_set_loss(user_emb, item_emb, pos_idx, *, exclude=None, tail_skip_idx=None, clamp=None,
                          reduction="sum", backend="auto"):
    """HetComp's phase-1 set-level loss: each positive against the summed catalog tail.

    Args:
        user_emb [B, d], item_emb [I, d]: as in full_catalog_listwise_loss.
        pos_idx: [B, P] int64 positive ids (HetComp: pi_o U pi_t); -1 is padding.
        exclude: CSR with B rows (e.g. training items) or None.
        tail_skip_idx: [B, M] int64 or None: further ids left out of the tail (-1 padding).
        clamp, reduction, backend: as in full_catalog_listwise_loss.

    Math: E_b = sum of exp(S_bj) over items j neither excluded, nor in pos_idx[b], nor in tail_skip_idx[b];
        L_b = -sum_{i in pos_b} [ S_bi - log(exp(S_bi) + E_b) ]
    A positive that repeats counts each time. Rows without positives give 0. Deviation from the authors'
    code: no 1e-5 floor on the denominator (the log-space form needs none).
    """
    clamp, indptr, indices, chosen = _prepare(user_emb, item_emb, pos_idx, "pos_idx", exclude, clamp,
                                              reduction, backend)
    pos_idx = pos_idx.to(torch.int64)
    skip = pos_idx
    if tail_skip_idx is not None:
        _checks.integer(tail_skip_idx, "tail_skip_idx", ndim=2)
        _checks.same_device(user_emb=user_emb, tail_skip_idx=tail_skip_idx)
        if tail_skip_idx.shape[0] != user_emb.shape[0]:
            raise ValueError(f"tail_skip_idx must have one row per user_emb row ({user_emb.shape[0]}), got shape {tuple(tail_skip_idx.shape)}")
        skip = torch.cat([pos_idx, tail_skip_idx.to(torch.int64)], 1)
    lt = _log_tail_op(user_emb, item_emb, skip, indptr, indices, clamp, chosen)
    s, valid = _gathered_scores(user_emb, item_emb, pos_idx, clamp)
    s_safe = torch.where(valid, s, torch.zeros_like(s))
    per = torch.logaddexp(s_safe, lt[:, None]) - s_safe
    per_row = torch.where(valid, per, torch.zeros_like(per)).sum(1)
    return reduce_rows(per_row, reduction)
