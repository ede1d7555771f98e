"""kdfast.full_catalog_listwise_loss / full_catalog_set_loss: listwise and set-level losses whose
tail is the whole catalog (no-sampling RRD, HetComp), without materialising the B x I score matrix.

Both losses are built on one fused op, the per-row log-tail
    log_tail_b = log sum_{j in T_b} exp(S_bj),   S_bj = clamp(<u_b, v_j>, -c, c),
    T_b = every item that is neither in the exclusion CSR row b nor among the row's skip ids
(the ranked / positive ids and any extra ids), registered as the torch.library custom op
kdfast::full_catalog_log_tail with its own backward op. The few ranked/positive scores are ordinary
differentiable gathers; the Plackett-Luce part goes through kdfast.plackett_luce_loss.

Backends (one row each in BACKENDS, the same functions in each module; results in float32, float64
for float64 inputs; (indptr, indices) a canonical CSR of each row's left-out items, clamp a float):
    log_tail(user_emb, item_emb, indptr, indices, clamp) -> log_tail [B]
    log_tail_backward(grad, log_tail, user_emb, item_emb, indptr, indices, clamp)
        -> (grad_user [B, d], grad_item [I, d])
"""

from __future__ import annotations

import math

import torch

from ..._core import backend as _backend
from ..._core import checks
from ..._core.autodiff import differentiable
from ..._core.csr import as_csr, validate_csr, with_ids
from ..._core.numerics import acc_dtype, gather_rows, reduce_rows
from ..plackett_luce import plackett_luce_loss
from . import cpu, reference


def _triton():
    from . import triton  # on first use: Triton reads TRITON_INTERPRET when the kernels are defined

    return triton


BACKENDS = {"torch": lambda: reference, "cpp": lambda: cpu, "triton": _triton}


def _log_tail_impl(user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend):
    n_items = item_emb.shape[0]
    validate_csr(excl_indptr, excl_indices, "exclude", n_items)
    checks.index_range(skip_idx, "ranked/positive/skip ids", n_items, allow_pad=True)
    if user_emb.shape[0] == 0:
        return user_emb.new_empty((0,), dtype=acc_dtype(user_emb.dtype))
    indptr, indices = with_ids(excl_indptr, excl_indices, skip_idx, n_items)
    impl = BACKENDS[backend]()
    return impl.log_tail(user_emb.contiguous(), item_emb.contiguous(), indptr, indices, clamp)


@torch.library.custom_op("kdfast::full_catalog_log_tail", mutates_args=())
def _log_tail_op(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    skip_idx: torch.Tensor,
    excl_indptr: torch.Tensor,
    excl_indices: torch.Tensor,
    clamp: float,
    backend: str,
) -> torch.Tensor:
    return _log_tail_impl(user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend)


@_log_tail_op.register_fake
def _(user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend):
    return user_emb.new_empty((user_emb.shape[0],), dtype=acc_dtype(user_emb.dtype))


def _log_tail_bwd_impl(
    grad, lt, user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend
):
    acc = acc_dtype(user_emb.dtype)
    if user_emb.shape[0] == 0:
        return user_emb.new_zeros(user_emb.shape, dtype=acc), item_emb.new_zeros(
            item_emb.shape, dtype=acc
        )
    indptr, indices = with_ids(excl_indptr, excl_indices, skip_idx, item_emb.shape[0])
    impl = BACKENDS[backend]()
    return impl.log_tail_backward(
        grad.contiguous(),
        lt.contiguous(),
        user_emb.contiguous(),
        item_emb.contiguous(),
        indptr,
        indices,
        clamp,
    )


@torch.library.custom_op("kdfast::full_catalog_log_tail_backward", mutates_args=())
def _log_tail_bwd_op(
    grad: torch.Tensor,
    lt: torch.Tensor,
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    skip_idx: torch.Tensor,
    excl_indptr: torch.Tensor,
    excl_indices: torch.Tensor,
    clamp: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_tail_bwd_impl(
        grad, lt, user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend
    )


@_log_tail_bwd_op.register_fake
def _(grad, lt, user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend):
    acc = acc_dtype(user_emb.dtype)
    return user_emb.new_empty(user_emb.shape, dtype=acc), item_emb.new_empty(
        item_emb.shape, dtype=acc
    )


def _setup(ctx, inputs, output):
    user_emb, item_emb, skip_idx, excl_indptr, excl_indices, clamp, backend = inputs
    ctx.save_for_backward(output, user_emb, item_emb, skip_idx, excl_indptr, excl_indices)
    ctx.clamp, ctx.backend = clamp, backend


def _backward(ctx, grad, *, bwd):
    lt, user_emb, item_emb, skip_idx, excl_indptr, excl_indices = ctx.saved_tensors
    gu, gi = bwd(
        grad, lt, user_emb, item_emb, skip_idx, excl_indptr, excl_indices, ctx.clamp, ctx.backend
    )
    return gu.to(user_emb.dtype), gi.to(item_emb.dtype), None, None, None, None, None


_log_tail = differentiable(
    _log_tail_op,
    _log_tail_impl,
    setup=_setup,
    backward=_backward,
    bwd_op=_log_tail_bwd_op,
    bwd_impl=_log_tail_bwd_impl,
    name="full_catalog_log_tail",
    module="full_catalog",
)


def _prepare(user_emb, item_emb, idx, idx_name, exclude, clamp, reduction, backend):
    checks.floating(user_emb, "user_emb", ndim=2)
    checks.floating(item_emb, "item_emb", ndim=2)
    checks.integer(idx, idx_name, ndim=2)
    device = checks.same_device(user_emb=user_emb, item_emb=item_emb, **{idx_name: idx})
    checks.same_dim(user_emb, "user_emb", item_emb, "item_emb")
    checks.same_dtype(user_emb, "user_emb", item_emb, "item_emb")
    checks.rows_of(idx, idx_name, user_emb.shape[0], "user_emb")
    if item_emb.shape[0] == 0:
        raise ValueError("item_emb must hold at least one item")
    if clamp is None:
        clamp = math.inf
    else:
        clamp = checks.positive_number(clamp, "clamp")
    checks.reduction(reduction)
    n_rows, n_items = user_emb.shape[0], item_emb.shape[0]
    indptr, indices = as_csr(exclude, "exclude", n_rows, n_items, device=device, optional=True)
    chosen = _backend.choose(backend, device.type, user_emb.dtype, tuple(BACKENDS))
    return clamp, indptr, indices, chosen


def gathered_scores(user_emb, item_emb, idx, clamp):
    """(scores, valid): clamp(<u_b, v_idx[b,k]>) [B, K] with -inf where idx is -1 (padding),
    float32 (float64 for float64), differentiable; valid = idx >= 0. clamp: a float (inf for none)
    or None."""
    dt = acc_dtype(user_emb.dtype)
    valid = idx >= 0
    rows = gather_rows(item_emb, idx.clamp_min(0))  # (not item_emb[idx]: reproducible gradients)
    s = torch.einsum("bd,bkd->bk", user_emb.to(dt), rows.to(dt))
    if clamp is not None and clamp != math.inf:
        s = s.clamp(-clamp, clamp)
    return torch.where(valid, s, torch.full_like(s, float("-inf"))), valid


def full_catalog_log_tail(
    user_emb, item_emb, skip_idx=None, *, exclude=None, clamp=None, backend="auto"
):
    """Per row, log sum of exp(clamp(<u_b, v_j>)) over every item j neither in exclude row b nor in
    skip_idx[b] (the fused op both losses use; differentiable in user_emb and item_emb).

    Args: user_emb [B, d], item_emb [I, d] floating, same dtype; skip_idx [B, M] int64 or None (-1
    is padding; repeats allowed); exclude CSR with B rows (see kdfast.as_csr) or None; clamp float >
    0 or None; backend "auto" | "torch" | "cpp" | "triton". Returns [B] float32 (float64 for float64
    inputs); -inf for a row whose items are all excluded.
    """
    if skip_idx is None:
        checks.floating(user_emb, "user_emb", ndim=2)
        skip_idx = torch.full((user_emb.shape[0], 0), -1, dtype=torch.int64, device=user_emb.device)
    clamp, indptr, indices, chosen = _prepare(
        user_emb, item_emb, skip_idx, "skip_idx", exclude, clamp, "sum", backend
    )
    return _log_tail(user_emb, item_emb, skip_idx.to(torch.int64), indptr, indices, clamp, chosen)


def full_catalog_listwise_loss(
    user_emb, item_emb, ranked_idx, *, exclude=None, clamp=None, reduction="sum", backend="auto"
):
    """Relaxed Plackett-Luce loss of a ranked list against the whole rest of the catalog (RRD
    without sampling; HetComp's ListMLE with a catalog tail), never materialising the B x I scores.

    Args:
        user_emb: [B, d] float32 (float64, and float16/bfloat16 on GPU, accepted): the batch's
            users.
        item_emb: [I, d], same dtype and device: every item.
        ranked_idx: [B, K] int64 item ids in teacher order; -1 is padding (anywhere in the row).
        exclude: CSR with B rows (e.g. each user's training items; repeats allowed) or None.
        clamp: c > 0 clamps every score to [-c, c] with zero gradient outside (HetComp uses 40),
            or None.
        reduction: "sum" (default, as every lambda in docs/METHODS.md assumes), "mean" over rows,
            or "none" ([B]).
        backend: "auto", "torch", "cpp" or "triton" (see kdfast.backends()).

    Math, per row with ranked scores s_1..s_K (valid entries only) and tail T_b = items neither
    excluded nor ranked:
        L_b = -sum_k [ s_k - log( sum_{j>=k} exp(s_j) + sum_{t in T_b} exp(S_bt) ) ]
    A row with no valid ranked id has loss 0 and gradient 0. The tail's log-sum is the fused op
    kdfast::full_catalog_log_tail. Deterministic: the same bits run to run on every backend (cpp:
    for any thread count; torch: for one thread count, its GEMMs split sums by threads). First-order
    only.
    """
    clamp, indptr, indices, chosen = _prepare(
        user_emb, item_emb, ranked_idx, "ranked_idx", exclude, clamp, reduction, backend
    )
    ranked_idx = ranked_idx.to(torch.int64)
    lt = _log_tail(user_emb, item_emb, ranked_idx, indptr, indices, clamp, chosen)
    s, _ = gathered_scores(user_emb, item_emb, ranked_idx, clamp)
    per_row = plackett_luce_loss(s, None, log_tail=lt, reduction="none", backend=chosen)
    return reduce_rows(per_row, reduction)


def full_catalog_set_loss(
    user_emb,
    item_emb,
    pos_idx,
    *,
    exclude=None,
    tail_skip_idx=None,
    clamp=None,
    reduction="sum",
    backend="auto",
):
    """HetComp's phase-1 set-level loss: each positive against the summed catalog tail.

    Args:
        user_emb [B, d], item_emb [I, d]: as in full_catalog_listwise_loss.
        pos_idx: [B, P] int64 positive ids (HetComp: pi_o U pi_t); -1 is padding.
        exclude: CSR with B rows (e.g. training items) or None.
        tail_skip_idx: [B, M] int64 or None: further ids left out of the tail (-1 padding).
        clamp, reduction, backend: as in full_catalog_listwise_loss.

    Math: E_b = sum of exp(S_bj) over items j neither excluded, nor in pos_idx[b], nor in
    tail_skip_idx[b];  L_b = -sum_{i in pos_b} [ S_bi - log(exp(S_bi) + E_b) ]
    A positive that repeats counts each time. Rows without positives give 0. Deviation from the
    authors' code: no 1e-5 floor on the denominator (the log-space form needs none).
    """
    clamp, indptr, indices, chosen = _prepare(
        user_emb, item_emb, pos_idx, "pos_idx", exclude, clamp, reduction, backend
    )
    pos_idx = pos_idx.to(torch.int64)
    skip = pos_idx
    if tail_skip_idx is not None:
        checks.integer(tail_skip_idx, "tail_skip_idx", ndim=2)
        checks.same_device(user_emb=user_emb, tail_skip_idx=tail_skip_idx)
        checks.rows_of(tail_skip_idx, "tail_skip_idx", user_emb.shape[0], "user_emb")
        skip = torch.cat([pos_idx, tail_skip_idx.to(torch.int64)], 1)
    lt = _log_tail(user_emb, item_emb, skip, indptr, indices, clamp, chosen)
    s, valid = gathered_scores(user_emb, item_emb, pos_idx, clamp)
    s_safe = torch.where(valid, s, torch.zeros_like(s))
    per = torch.logaddexp(s_safe, lt[:, None]) - s_safe
    per_row = torch.where(valid, per, torch.zeros_like(per)).sum(1)
    return reduce_rows(per_row, reduction)
