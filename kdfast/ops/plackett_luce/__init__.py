"""kdfast.plackett_luce_loss and kdfast.plackett_luce_loss_from_embeddings: the relaxed
Plackett-Luce (listwise) loss of RRD / IR-RRD / ListMLE / ConCF, fused, in log space, on ragged
(-inf padded) lists.

Backends (one row each in BACKENDS, the same functions in each module; results in float32, float64
for float64 inputs; gradients "at unit upstream gradient", i.e. of each row's own loss):
    loss_and_grads(ranked, unranked, log_tail, need_grad)
        -> (loss [B], d_ranked [B, K], d_unranked [B, L], d_tail [B])
    emb_forward(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad)
        -> (loss [B], d_ranked [B, K], d_unranked [B, L], d_tail [B], grad_query [B, d])
       (checks the ids: ValueError naming the argument for one out of range)
    emb_backward(grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked,
        grad_query) -> (grad_query [n_rows, d], grad_item [N, d])
Absent or unneeded gradients are empty [0] tensors. B is the number of rows evaluated: len(rows), or
the rows of ranked / query. The backward of both losses is linear in the upstream gradient (first
order only; see kdfast._core.autodiff).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._core import backend as _backend
from ..._core import checks
from ..._core.autodiff import check_kept, differentiable, requires_grad, scaled
from ..._core.numerics import acc_dtype, reduce_rows
from . import cpu, reference
from .rows import add_rows


def _triton():
    from . import triton  # on first use: Triton reads TRITON_INTERPRET when the kernels are defined

    return triton


def _numba():
    from . import numba  # on first use: kdfast imports without numba

    return numba


BACKENDS = {"torch": lambda: reference, "cpp": lambda: cpu, "triton": _triton, "numba": _numba}


def _dtype_of(x):
    return None if x is None else x.dtype


# ------------------------------------------------------------------------------------------ scores
def _scores_impl(ranked, unranked, log_tail, need_grad, backend):
    return BACKENDS[backend]().loss_and_grads(ranked, unranked, log_tail, need_grad)


@torch.library.custom_op("kdfast::plackett_luce", mutates_args=())
def _scores_op(
    ranked: torch.Tensor,
    unranked: Optional[torch.Tensor],
    log_tail: Optional[torch.Tensor],
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _scores_impl(ranked, unranked, log_tail, need_grad, backend)


@_scores_op.register_fake
def _(ranked, unranked, log_tail, need_grad, backend):
    B, acc = ranked.shape[0], acc_dtype(ranked.dtype)

    def out(x, shape):
        return ranked.new_empty(shape if need_grad and x is not None else (0,), dtype=acc)

    return (
        ranked.new_empty((B,), dtype=acc),
        out(ranked, ranked.shape),
        out(unranked, (B, 0 if unranked is None else unranked.shape[1])),
        out(log_tail, (B,)),
    )


def _scores_setup(ctx, inputs, output):
    ranked, unranked, log_tail, need_grad, _ = inputs
    # the auxiliary outputs get no gradient: no zero tensors for them
    ctx.set_materialize_grads(False)
    ctx.dtypes = (ranked.dtype, _dtype_of(unranked), _dtype_of(log_tail))
    ctx.need_grad = need_grad
    ctx.save_for_backward(*output[1:])


def _scores_backward(ctx, g_loss, *unused, bwd):
    check_kept(ctx, {0: ctx.need_grad, 1: ctx.need_grad, 2: ctx.need_grad}, "plackett_luce_loss")
    if g_loss is None:
        return None, None, None, None, None
    grads = (scaled(g_loss, d, dt) for d, dt in zip(ctx.saved_tensors, ctx.dtypes))
    return (*grads, None, None)


_scores = differentiable(
    _scores_op,
    _scores_impl,
    setup=_scores_setup,
    backward=_scores_backward,
    name="plackett_luce_loss",
    module="plackett_luce",
)


def _check_common(B, K, has_unranked, log_tail, reduction, k_name):
    checks.reduction(reduction)
    if K == 0 and not has_unranked:
        raise ValueError(
            f"{k_name} has K = 0 columns and there is no unranked list: nothing to rank"
        )
    if log_tail is not None:
        checks.floating(log_tail, "log_tail", ndim=1)
        if log_tail.shape[0] != B:
            raise ValueError(f"log_tail must have shape [B] = [{B}], got {tuple(log_tail.shape)}")


def plackett_luce_loss(ranked, unranked=None, *, log_tail=None, reduction="sum", backend="auto"):
    """Relaxed Plackett-Luce loss of the student scores of teacher-ranked lists (RRD,
    docs/METHODS.md section 5).

    Args:
        ranked: [B, K] floating scores of the items the teacher ranks, in teacher order. -inf
            entries are padding (ragged lists): they contribute nothing, wherever they sit.
        unranked: optional [B, L] scores (same dtype) of items ranked below all of them, in no
            order; -inf is padding.
        log_tail: optional [B] log of extra mass added to every denominator (the rest of the
            catalog).
        reduction: "sum" (the papers' convention), "mean" over rows, or "none" ([B] per-row
            losses).
        backend: "auto", "torch", "cpp" or "numba" (float32/float64 CPU tensors) or "triton"
            (CUDA; float16 and bfloat16 accepted with float32 math).

    Returns:
        The loss, float32 (float64 for float64 input).

    Math, per row with valid ranked s_1..s_K, valid unranked u_l and t = log_tail:
        loss = -sum_k [ s_k - log( sum_{j>=k} exp(s_j) + sum_l exp(u_l) + exp(t) ) ]
    evaluated in log space (a suffix log-sum-exp scan), so it is finite and exact for scores up to
    +-1e4 in float32. Gradient: dL/ds_j = exp(s_j) sum_{k<=j} 1/D_k - 1, dL/du_l = exp(u_l) sum_k
    1/D_k, dL/dt = exp(t) sum_k 1/D_k, computed in one pass per row (a prefix log-sum-exp). A row
    with no valid
    ranked entry has loss 0 and gradient 0. NaN entries are not padding: they propagate. The cpp and
    triton backends are deterministic. First-order only (a second derivative raises).
    """
    checks.floating(ranked, "ranked", ndim=2)
    B, K = ranked.shape
    if unranked is not None:
        checks.floating(unranked, "unranked", ndim=2)
        checks.rows_of(unranked, "unranked", B, "ranked")
        if unranked.dtype != ranked.dtype:
            raise TypeError(
                f"unranked must have ranked's dtype {ranked.dtype}, got {unranked.dtype}"
            )
    _check_common(B, K, unranked is not None, log_tail, reduction, "ranked")
    device = checks.same_device(ranked=ranked, unranked=unranked, log_tail=log_tail)
    chosen = _backend.choose(backend, device.type, ranked.dtype, tuple(BACKENDS))
    acc = acc_dtype(ranked.dtype)
    if K == 0:
        return reduce_rows(ranked.to(acc).sum(1), reduction)
    if log_tail is not None:
        log_tail = log_tail.to(acc)
    need_grad = requires_grad(ranked, unranked, log_tail)
    per_row = _scores(ranked, unranked, log_tail, need_grad, chosen)[0]
    return reduce_rows(per_row, reduction)


# -------------------------------------------------------------------------------------- embeddings
def _emb_impl(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad, backend):
    impl = BACKENDS[backend]()
    return impl.emb_forward(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad)


@torch.library.custom_op("kdfast::plackett_luce_emb", mutates_args=())
def _emb_op(
    query: torch.Tensor,
    item: torch.Tensor,
    ranked_idx: torch.Tensor,
    unranked_idx: Optional[torch.Tensor],
    log_tail: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _emb_impl(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad, backend)


@_emb_op.register_fake
def _(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad, backend):
    B = query.shape[0] if rows is None else rows.shape[0]
    acc = acc_dtype(query.dtype)

    def out(present, *shape):
        return query.new_empty(shape if need_grad and present else (0,), dtype=acc)

    L = 0 if unranked_idx is None else unranked_idx.shape[1]
    return (
        query.new_empty((B,), dtype=acc),
        out(True, B, ranked_idx.shape[1]),
        out(unranked_idx is not None, B, L),
        out(log_tail is not None, B),
        out(True, B, query.shape[1]),
    )


def _emb_bwd_impl(
    grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked, grad_query, backend
):
    impl = BACKENDS[backend]()
    return impl.emb_backward(
        grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked, grad_query
    )


@torch.library.custom_op("kdfast::plackett_luce_emb_backward", mutates_args=())
def _emb_bwd_op(
    grad: torch.Tensor,
    query: torch.Tensor,
    item: torch.Tensor,
    ranked_idx: torch.Tensor,
    unranked_idx: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    d_ranked: torch.Tensor,
    d_unranked: torch.Tensor,
    grad_query: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _emb_bwd_impl(
        grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked, grad_query, backend
    )


@_emb_bwd_op.register_fake
def _(grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked, grad_query, backend):
    acc = acc_dtype(query.dtype)
    return query.new_empty(query.shape, dtype=acc), item.new_empty(item.shape, dtype=acc)


def _emb_setup(ctx, inputs, output):
    query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad, backend = inputs
    _, d_r, d_u, d_t, gq = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, item, ranked_idx, unranked_idx, rows, d_r, d_u, d_t, gq)
    ctx.dtypes = (query.dtype, item.dtype, _dtype_of(log_tail))
    ctx.backend, ctx.need_grad = backend, need_grad


def _emb_backward(ctx, g_loss, *unused, bwd):
    kept = ctx.need_grad
    check_kept(ctx, {0: kept, 1: kept, 4: kept}, "plackett_luce_loss_from_embeddings")
    if g_loss is None:
        return (None,) * 8
    query, item, ranked_idx, unranked_idx, rows, d_r, d_u, d_t, gq = ctx.saved_tensors
    q_dt, e_dt, t_dt = ctx.dtypes
    g = g_loss.to(gq.dtype)
    grad_q, grad_e = bwd(g, query, item, ranked_idx, unranked_idx, rows, d_r, d_u, gq, ctx.backend)
    grad_t = None if t_dt is None else add_rows(g * d_t, rows, query.shape[0]).to(t_dt)
    return grad_q.to(q_dt), grad_e.to(e_dt), None, None, grad_t, None, None, None


_emb = differentiable(
    _emb_op,
    _emb_impl,
    setup=_emb_setup,
    backward=_emb_backward,
    bwd_op=_emb_bwd_op,
    bwd_impl=_emb_bwd_impl,
    name="plackett_luce_loss_from_embeddings",
    module="plackett_luce",
)


def _ids(idx, name, B):
    checks.integer(idx, name, ndim=2)
    checks.rows_of(idx, name, B, "query_emb")
    return idx.to(torch.int64)


def plackett_luce_loss_from_embeddings(
    query_emb,
    item_emb,
    ranked_idx,
    unranked_idx=None,
    *,
    log_tail=None,
    rows=None,
    reduction="sum",
    backend="auto",
):
    """plackett_luce_loss on dot-product scores gathered from embeddings, in one kernel.

    s_bk = <query_emb[b], item_emb[ranked_idx[b, k]]>,
    u_bl = <query_emb[b], item_emb[unranked_idx[b, l]]>;
    id -1 is padding (the score is -inf). The loss is plackett_luce_loss(s, u, log_tail=...,
    reduction=...), computed without materialising the [B, K+L, d] gathered tensor.

    Args:
        query_emb: [B, d] floating (float16/bfloat16 on the GPU, float32 math; float64 -> float64
            math).
        item_emb: [N, d], same dtype and device.
        ranked_idx: [B, K] integer ids in [0, N) or -1, teacher order.
        unranked_idx: optional [B, L] integer ids in [0, N) or -1.
        rows: optional int64 [R] ids in [0, B): evaluate only these rows, exactly as if query_emb,
            ranked_idx, unranked_idx and log_tail had each been indexed with [rows] first (the
            result has R rows; repeated rows count again), but without the gathered copies: a
            training step passes the whole user table and the whole per-epoch sample tables with the
            batch's users as rows. Gradients still reach the full query_emb (and log_tail).
        log_tail, reduction, backend: as in plackett_luce_loss.

    Gradients reach query_emb and the touched rows of item_emb (repeated ids accumulate).
    Determinism: the cpp backend sums each item row in a fixed order (batch row, then position; the
    same for any thread count), bitwise reproducible; the triton backend accumulates item gradients
    with float32 atomic adds by default, whose order (and so the last bits) can vary run to run, and
    under torch.use_deterministic_algorithms(True) sums them with a chunked sort-based index_add_
    instead (reproducible, slower). First-order only (a second derivative raises).
    """
    checks.floating(query_emb, "query_emb", ndim=2)
    checks.floating(item_emb, "item_emb", ndim=2)
    B = query_emb.shape[0]
    checks.same_dim(query_emb, "query_emb", item_emb, "item_emb")
    checks.same_dtype(query_emb, "query_emb", item_emb, "item_emb")
    ranked_idx = _ids(ranked_idx, "ranked_idx", B)
    unranked_idx = None if unranked_idx is None else _ids(unranked_idx, "unranked_idx", B)
    _check_common(
        B, ranked_idx.shape[1], unranked_idx is not None, log_tail, reduction, "ranked_idx"
    )
    if rows is not None:
        rows = checks.integer(rows, "rows", ndim=1).to(torch.int64)
    device = checks.same_device(
        query_emb=query_emb,
        item_emb=item_emb,
        ranked_idx=ranked_idx,
        unranked_idx=unranked_idx,
        log_tail=log_tail,
        rows=rows,
    )
    chosen = _backend.choose(backend, device.type, query_emb.dtype, tuple(BACKENDS))
    if log_tail is not None:
        log_tail = log_tail.to(acc_dtype(query_emb.dtype))
    need_grad = requires_grad(query_emb, item_emb, log_tail)
    per_row = _emb(
        query_emb, item_emb, ranked_idx, unranked_idx, log_tail, rows, need_grad, chosen
    )[0]
    return reduce_rows(per_row, reduction)
