"""kdfast.plackett_luce_loss and kdfast.plackett_luce_loss_from_embeddings: the relaxed Plackett-Luce
(listwise) loss of RRD / IR-RRD / ListMLE / ConCF, fused, in log space, on ragged (-inf padded) lists.

Each public function checks its arguments (static checks only), picks a backend and calls a
torch.library custom op (with a fake implementation and an autograd formula, so torch.compile with
fullgraph=True traces through it). Outside torch.compile it calls the same implementation, context setup
and gradient through a plain torch.autograd.Function instead: the dispatcher's per-call cost (about
0.15 ms per forward + backward of the embedding form on the CPU) was a tenth of an RRD training step.
The "torch" backend is the differentiable reference itself.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _backend, _checks
from ..reference import plackett_luce as _ref



def _impl(backend: str):
    return importlib.import_module(f"kdfast.{backend}.plackett_luce")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- scores
def _fwd_impl(ranked, unranked, log_tail, backend):
    return _impl(backend).forward(ranked, unranked, log_tail)


@torch.library.custom_op("kdfast::plackett_luce_fwd", mutates_args=())
def _fwd_op(ranked: torch.Tensor, unranked: Optional[torch.Tensor], log_tail: Optional[torch.Tensor],
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(ranked, unranked, log_tail, backend)


@_fwd_op.register_fake
def _(ranked, unranked, log_tail, backend):
    B = ranked.shape[0]
    return tuple(ranked.new_empty(B, dtype=_acc(ranked.dtype)) for _ in range(3))


def _bwd_impl(grad, ranked, unranked, log_tail, log_rest, log_inv, backend):
    return _impl(backend).backward(grad, ranked, unranked, log_tail, log_rest, log_inv)


@torch.library.custom_op("kdfast::plackett_luce_bwd", mutates_args=())
def _bwd_op(grad: torch.Tensor, ranked: torch.Tensor, unranked: Optional[torch.Tensor],
            log_tail: Optional[torch.Tensor], log_rest: torch.Tensor, log_inv: torch.Tensor,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad, ranked, unranked, log_tail, log_rest, log_inv, backend)


@_bwd_op.register_fake
def _(grad, ranked, unranked, log_tail, log_rest, log_inv, backend):
    return (torch.empty_like(ranked),
            torch.empty_like(unranked) if unranked is not None else ranked.new_empty(0),
            torch.empty_like(log_tail) if log_tail is not None else ranked.new_empty(0))


def _fwd_setup(ctx, inputs, output):
    ranked, unranked, log_tail, backend = inputs
    _, rest, inv = output
    ctx.set_materialize_grads(False)  # the auxiliary outputs get no gradient: no zero tensors for them
    ctx.save_for_backward(ranked, unranked, log_tail, rest, inv)
    ctx.backend = backend


def _fwd_grads(ctx, g_loss, bwd):
    ranked, unranked, log_tail, rest, inv = ctx.saved_tensors
    if g_loss is None:
        g_loss = torch.zeros_like(rest)
    gs, gu, gt = bwd(g_loss, ranked, unranked, log_tail, rest, inv, ctx.backend)
    return gs, (gu if unranked is not None else None), (gt if log_tail is not None else None), None


def _fwd_backward(ctx, g_loss, g_rest, g_inv):
    return _fwd_grads(ctx, g_loss, _bwd_op)


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _eager_function(name, impl, setup, grads, bwd_impl):
    """A torch.autograd.Function running a custom op's implementation, context setup and gradient without
    the dispatcher (for eager calls). Output 0 is the loss; the others are saved auxiliaries."""

    def forward(ctx, *inputs):  # (not a setup_context method: apply() would inspect the signature per call)
        output = impl(*inputs)
        setup(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    def backward(ctx, g_loss, *unused):
        return grads(ctx, g_loss, bwd_impl)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward)})


_FwdEager = _eager_function("_FwdEager", _fwd_impl, _fwd_setup, _fwd_grads, _bwd_impl)


def _call(op, eager, *args):
    """The custom op while torch.compile traces, the autograd.Function otherwise (same results)."""
    return op(*args) if torch.compiler.is_compiling() else eager.apply(*args)


@torch.compiler.assume_constant_result
def _choose(backend: str, device_type: str) -> str:
    # Run eagerly even under torch.compile: backend resolution imports the extension (untraceable).
    return _backend.resolve(backend, torch.device(device_type))


def _check_common(B, K, has_unranked, log_tail, reduction, device, k_name):
    _checks.reduction(reduction)
    if K == 0 and not has_unranked:
        raise ValueError(f"{k_name} has K = 0 columns and there is no unranked list: nothing to rank")
    if log_tail is not None:
        _checks.floating(log_tail, "log_tail", ndim=1)
        if log_tail.shape[0] != B:
            raise ValueError(f"log_tail must have shape [B] = [{B}], got {tuple(log_tail.shape)}")


def plackett_luce_loss(ranked, unranked=None, *, log_tail=None, reduction="sum", backend="auto"):
    """Relaxed Plackett-Luce loss of the student scores of teacher-ranked lists (RRD, docs/METHODS.md section 5).

    Args:
        ranked: [B, K] floating scores of the items the teacher ranks, in teacher order. -inf entries are
            padding (ragged lists): they contribute nothing, wherever they sit.
        unranked: optional [B, L] scores (same dtype) of items ranked below all of them, in no order;
            -inf is padding.
        log_tail: optional [B] log of extra mass added to every denominator (the rest of the catalog).
        reduction: "sum" (the papers' convention), "mean" over rows, or "none" ([B] per-row losses).
        backend: "auto", "torch", "cpp" (float32/float64 CPU tensors) or "triton" (CUDA; float16 and
            bfloat16 accepted with float32 math).

    Returns:
        The loss, float32 (float64 for float64 input).

    Math, per row with valid ranked s_1..s_K, valid unranked u_l and t = log_tail:
        loss = -sum_k [ s_k - log( sum_{j>=k} exp(s_j) + sum_l exp(u_l) + exp(t) ) ]
    evaluated in log space (a suffix log-sum-exp scan), so it is finite and exact for scores up to
    +-1e4 in float32. Gradient: dL/ds_j = exp(s_j) sum_{k<=j} 1/D_k - 1, dL/du_l = exp(u_l) sum_k 1/D_k,
    dL/dt = exp(t) sum_k 1/D_k, computed in one pass per row (a prefix log-sum-exp). A row with no valid
    ranked entry has loss 0 and gradient 0. NaN entries are not padding: they propagate. The cpp and
    triton backends are deterministic.
    """
    _checks.floating(ranked, "ranked", ndim=2)
    B, K = ranked.shape
    if unranked is not None:
        _checks.floating(unranked, "unranked", ndim=2)
        if unranked.shape[0] != B:
            raise ValueError(f"unranked must have B = {B} rows like ranked, got shape {tuple(unranked.shape)}")
        if unranked.dtype != ranked.dtype:
            raise TypeError(f"unranked must have ranked's dtype {ranked.dtype}, got {unranked.dtype}")
    _check_common(B, K, unranked is not None, log_tail, reduction, ranked.device, "ranked")
    device = _checks.same_device(ranked=ranked, unranked=unranked, log_tail=log_tail)
    chosen = _choose(backend, device.type)
    if chosen == "cpp" and ranked.dtype in (torch.float16, torch.bfloat16):
        raise TypeError("backend='cpp' takes float32 or float64 scores; float16/bfloat16 are GPU dtypes")
    if chosen == "torch":
        return _ref.plackett_luce_loss(ranked, unranked, log_tail, reduction)
    acc = _acc(ranked.dtype)
    if K == 0:
        return _ref.reduce_rows(ranked.to(acc).sum(1), reduction)
    if log_tail is not None:
        log_tail = log_tail.to(acc)
    per_row, _, _ = _call(_fwd_op, _FwdEager, ranked, unranked, log_tail, chosen)
    return _ref.reduce_rows(per_row, reduction)


# ---------------------------------------------------------------------------------------- embeddings
def _emb_fwd_impl(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad, backend):
    if backend == "cpp":  # checks the ids (and rows) inside the kernel, for free
        return _impl(backend).emb_forward(query, item, ranked_idx, unranked_idx, log_tail, need_grad, rows)
    N = item.shape[0]
    _checks.index_range(ranked_idx, "ranked_idx", N, allow_pad=True)
    if unranked_idx is not None:
        _checks.index_range(unranked_idx, "unranked_idx", N, allow_pad=True)
    return _impl(backend).emb_forward(query, item, ranked_idx, unranked_idx, log_tail, need_grad)


@torch.library.custom_op("kdfast::plackett_luce_emb_fwd", mutates_args=())
def _emb_fwd_op(query: torch.Tensor, item: torch.Tensor, ranked_idx: torch.Tensor,
                unranked_idx: Optional[torch.Tensor], log_tail: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                need_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor]:
    return _emb_fwd_impl(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad, backend)


@_emb_fwd_op.register_fake
def _(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad, backend):
    B, D = query.shape
    if rows is not None:
        B = rows.shape[0]
    K = ranked_idx.shape[1]
    L = 0 if unranked_idx is None else unranked_idx.shape[1]
    acc = _acc(query.dtype)

    def new(*shape):
        return query.new_empty(shape, dtype=acc)

    if backend == "cpp":  # the row gradients at grad_output = 1: dr, du, dt, -, gq
        if not need_grad:
            return new(B), new(0), new(0), new(0), new(0), new(0)
        return (new(B), new(B, K), (new(B, L) if unranked_idx is not None else new(0)),
                (new(B) if log_tail is not None else new(0)), new(0), new(B, D))
    if need_grad:  # triton: ranked coefficients, unranked scores, unranked part of grad_query
        return new(B), new(B, K), new(B, L), new(B), new(B), new(B, D)
    return new(B), new(0), new(0), new(B), new(B), new(0)


def _emb_bwd_impl(grad, query, item, ranked_idx, unranked_idx, log_tail, rows, saved_ranked, saved_unranked,
                  log_rest, log_inv, aux, backend):
    if backend == "cpp":
        return _impl(backend).emb_backward(grad, query, item, ranked_idx, unranked_idx, log_tail, saved_ranked,
                                           saved_unranked, log_rest, log_inv, aux, rows)
    return _impl(backend).emb_backward(grad, query, item, ranked_idx, unranked_idx, log_tail, saved_ranked,
                                       saved_unranked, log_rest, log_inv, aux)


@torch.library.custom_op("kdfast::plackett_luce_emb_bwd", mutates_args=())
def _emb_bwd_op(grad: torch.Tensor, query: torch.Tensor, item: torch.Tensor, ranked_idx: torch.Tensor,
                unranked_idx: Optional[torch.Tensor], log_tail: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                saved_ranked: torch.Tensor, saved_unranked: torch.Tensor, log_rest: torch.Tensor,
                log_inv: torch.Tensor, aux: torch.Tensor,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _emb_bwd_impl(grad, query, item, ranked_idx, unranked_idx, log_tail, rows, saved_ranked, saved_unranked,
                         log_rest, log_inv, aux, backend)


@_emb_bwd_op.register_fake
def _(grad, query, item, ranked_idx, unranked_idx, log_tail, rows, saved_ranked, saved_unranked, log_rest,
      log_inv, aux, backend):
    return (torch.empty_like(query), torch.empty_like(item),
            torch.empty_like(log_tail) if log_tail is not None else query.new_empty(0))


def _emb_setup(ctx, inputs, output):
    query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad, backend = inputs
    _, saved_r, saved_u, rest, inv, aux = output
    ctx.set_materialize_grads(False)  # the auxiliary outputs get no gradient: no zero tensors for them
    ctx.save_for_backward(query, item, ranked_idx, unranked_idx, log_tail, rows, saved_r, saved_u, rest, inv, aux)
    ctx.backend = backend


def _emb_grads(ctx, g_loss, bwd):
    query, item, ranked_idx, unranked_idx, log_tail, rows, saved_r, saved_u, rest, inv, aux = ctx.saved_tensors
    if g_loss is None:
        g_loss = query.new_zeros(query.shape[0] if rows is None else rows.shape[0], dtype=_acc(query.dtype))
    gq, ge, gt = bwd(g_loss, query, item, ranked_idx, unranked_idx, log_tail, rows, saved_r, saved_u, rest, inv,
                     aux, ctx.backend)
    return gq, ge, None, None, (gt if log_tail is not None else None), None, None, None


def _emb_backward(ctx, g_loss, *unused):
    return _emb_grads(ctx, g_loss, _emb_bwd_op)


_emb_fwd_op.register_autograd(_emb_backward, setup_context=_emb_setup)


_EmbEager = _eager_function("_EmbEager", _emb_fwd_impl, _emb_setup, _emb_grads, _emb_bwd_impl)


def plackett_luce_loss_from_embeddings(query_emb, item_emb, ranked_idx, unranked_idx=None, *, log_tail=None,
                                       rows=None, reduction="sum", backend="auto"):
    """plackett_luce_loss on dot-product scores gathered from embeddings, in one kernel.

    s_bk = <query_emb[b], item_emb[ranked_idx[b, k]]>, u_bl = <query_emb[b], item_emb[unranked_idx[b, l]]>;
    id -1 is padding (the score is -inf). The loss is plackett_luce_loss(s, u, log_tail=...,
    reduction=...), computed without materialising the [B, K+L, d] gathered tensor.

    Args:
        query_emb: [B, d] floating (float16/bfloat16 on the GPU, float32 math; float64 -> float64 math).
        item_emb: [N, d], same dtype and device.
        ranked_idx: [B, K] integer ids in [0, N) or -1, teacher order.
        unranked_idx: optional [B, L] integer ids in [0, N) or -1.
        rows: optional int64 [R] ids in [0, B): evaluate only these rows, exactly as if query_emb,
            ranked_idx, unranked_idx and log_tail had each been indexed with [rows] first (the result
            has R rows; repeated rows count again), but without the gathered copies: a training step
            passes the whole user table and the whole per-epoch sample tables with the batch's users
            as rows. Gradients still reach the full query_emb (and log_tail).
        log_tail, reduction, backend: as in plackett_luce_loss.

    Gradients reach query_emb and the touched rows of item_emb (repeated ids accumulate). Determinism:
    the cpp backend sums each item row in a fixed order (batch row, then position; the same for any
    thread count), bitwise reproducible; the triton backend accumulates item gradients with float32
    atomic adds by default, whose order (and so the last bits) can vary run to run, and under
    torch.use_deterministic_algorithms(True) sums them with a chunked sort-based index_add_ instead
    (reproducible, slower).
    """
    _checks.floating(query_emb, "query_emb", ndim=2)
    _checks.floating(item_emb, "item_emb", ndim=2)
    _checks.integer(ranked_idx, "ranked_idx", ndim=2)
    B, D = query_emb.shape
    if item_emb.shape[1] != D:
        raise ValueError(f"query_emb and item_emb must have the same dimension d, got {D} and {item_emb.shape[1]}")
    if item_emb.dtype != query_emb.dtype:
        raise TypeError(f"query_emb and item_emb must have the same dtype, got {query_emb.dtype} and {item_emb.dtype}")
    if ranked_idx.shape[0] != B:
        raise ValueError(f"ranked_idx must have B = {B} rows like query_emb, got shape {tuple(ranked_idx.shape)}")
    if unranked_idx is not None:
        _checks.integer(unranked_idx, "unranked_idx", ndim=2)
        if unranked_idx.shape[0] != B:
            raise ValueError(f"unranked_idx must have B = {B} rows like query_emb, got shape {tuple(unranked_idx.shape)}")
    K = ranked_idx.shape[1]
    _check_common(B, K, unranked_idx is not None, log_tail, reduction, query_emb.device, "ranked_idx")
    if rows is not None:
        _checks.integer(rows, "rows", ndim=1)
    device = _checks.same_device(query_emb=query_emb, item_emb=item_emb, ranked_idx=ranked_idx,
                                 unranked_idx=unranked_idx, log_tail=log_tail, rows=rows)
    chosen = _choose(backend, device.type)
    if chosen == "cpp" and query_emb.dtype in (torch.float16, torch.bfloat16):
        raise TypeError("backend='cpp' takes float32 or float64 embeddings; float16/bfloat16 are GPU dtypes")
    ranked_idx = ranked_idx.to(torch.int64)
    unranked_idx = None if unranked_idx is None else unranked_idx.to(torch.int64)
    if rows is not None:
        rows = rows.to(torch.int64)
        if chosen != "cpp":  # the other backends take the gathered rows (the cpp kernel gathers itself)
            _checks.index_range(rows, "rows", B)
            query_emb, ranked_idx = query_emb[rows], ranked_idx[rows]
            unranked_idx = None if unranked_idx is None else unranked_idx[rows]
            log_tail = None if log_tail is None else log_tail[rows]
            rows = None
    if chosen == "torch":
        N = item_emb.shape[0]
        _checks.index_range(ranked_idx, "ranked_idx", N, allow_pad=True)
        if unranked_idx is not None:
            _checks.index_range(unranked_idx, "unranked_idx", N, allow_pad=True)
        return _ref.plackett_luce_loss_from_embeddings(query_emb, item_emb, ranked_idx, unranked_idx, log_tail,
                                                       reduction)
    acc = _acc(query_emb.dtype)
    if log_tail is not None:
        log_tail = log_tail.to(acc)
    need_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (query_emb, item_emb, log_tail))
    per_row = _call(_emb_fwd_op, _EmbEager, query_emb, item_emb, ranked_idx, unranked_idx, log_tail, rows, need_grad,
                    chosen)[0]
    return _ref.reduce_rows(per_row, reduction)
