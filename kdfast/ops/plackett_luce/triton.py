"""Triton backend of the relaxed Plackett-Luce loss (scores and embedding-gather forms), with the
signatures of the op's backend contract (kdfast.ops.plackett_luce). Inputs may be float16/bfloat16/
float32 (float32 math) or float64 (float64 math); results come in float32 (float64).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._core.numerics import acc_dtype
from .rows import add_rows, check_ids, take_rows


@triton.jit
def _lse_combine(m1, z1, m2, z2):
    # (max, sum of exp(x - max)) pairs; -inf max with sum 0 is the empty element.
    m = tl.maximum(m1, m2)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return m, z1 * tl.exp(m1 - safe) + z2 * tl.exp(m2 - safe)


@triton.jit
def _logaddexp(a, b):
    # NaN in, NaN out (tl.maximum would drop it); +inf in, +inf out
    mx = tl.maximum(a, b)
    mn = tl.minimum(a, b)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    out = tl.where(mx == float("-inf"), mx, safe + tl.log(1.0 + tl.exp(mn - safe)))
    return tl.where((a != a) | (b != b), a + b, out)


@triton.jit
def _non_finite(flags, u, AXIS: tl.constexpr):
    # flags |= 1 for a NaN in u, |= 2 for a +inf (the online log-sum-exp cannot carry them)
    nan = tl.max((u != u).to(tl.int32), axis=AXIS)
    inf = tl.max((u == float("inf")).to(tl.int32), axis=AXIS)
    return flags | nan | (2 * inf)


@triton.jit
def _with_non_finite(rest, flags):
    # the unranked log-mass of the non-finite rule: NaN if a NaN was seen, else +inf if a +inf was
    return tl.where((flags & 1) != 0, float("nan"), tl.where((flags & 2) != 0, float("inf"), rest))


@triton.jit
def _ranked_terms(s, valid, rest, NEED_PREFIX: tl.constexpr):
    # s, valid: [R, BK]; rest: [R] (log of the unranked + tail mass).
    # Returns the loss per row, A_K = log sum_k 1/D_k per row, and (NEED_PREFIX) A_j = log
    # sum_{k<=j} 1/D_k.
    z0 = tl.where(valid, 1.0, 0.0).to(s.dtype)
    m_suf, z_suf = tl.associative_scan((s, z0), 1, _lse_combine, reverse=True)
    log_d = _logaddexp(m_suf + tl.log(z_suf), rest[:, None])
    loss = tl.sum(tl.where(valid, log_d - s, 0.0), axis=1)
    a = tl.where(valid, -log_d, float("-inf"))
    am = tl.max(a, axis=1)
    am_safe = tl.where(am == float("-inf"), 0.0, am)
    inv = tl.where(
        am == float("-inf"), am, am_safe + tl.log(tl.sum(tl.exp(a - am_safe[:, None]), axis=1))
    )
    if NEED_PREFIX:
        m_pre, z_pre = tl.associative_scan((a, z0), 1, _lse_combine)
        prefix = m_pre + tl.log(z_pre)
    else:
        prefix = a
    return loss, inv, prefix


# Score form, forward. Per row (R rows per program):
#   rest = logsumexp(u, t); log D_k = logaddexp(revlogcumsumexp(s)_k, rest)
#   loss = sum_{k valid} (log D_k - s_k);  inv = log sum_{k valid} exp(-log D_k)
# The suffix log-sum-exp is an associative scan of (max, sum) pairs, exact at any scale.
# Memory plan: reads s [R, K] and u [R, L] once (u in chunks of BLOCK_L with an online log-sum-exp),
# writes loss, rest, inv ([R] each); everything else stays in registers.
@triton.jit
def _fwd_kernel(
    s_ptr,
    u_ptr,
    t_ptr,
    loss_ptr,
    rest_ptr,
    inv_ptr,
    B,
    K,
    L,
    HAS_U: tl.constexpr,
    HAS_T: tl.constexpr,
    CDT: tl.constexpr,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    NL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    rmask = rows < B
    m_r = tl.full([R], float("-inf"), CDT)
    z_r = tl.zeros([R], CDT)
    flags = tl.zeros([R], tl.int32)
    if HAS_U:
        for lc in range(NL):
            ls = lc * BLOCK_L + tl.arange(0, BLOCK_L)
            msk = rmask[:, None] & (ls < L)[None, :]
            u = tl.load(u_ptr + rows[:, None] * L + ls[None, :], mask=msk, other=float("-inf")).to(
                CDT
            )
            flags = _non_finite(flags, u, 1)
            m_new = tl.maximum(m_r, tl.max(u, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            z_r = z_r * tl.exp(m_r - safe) + tl.sum(tl.exp(u - safe[:, None]), axis=1)
            m_r = m_new
    rest = _with_non_finite(tl.where(z_r > 0, m_r + tl.log(z_r), float("-inf")), flags)
    if HAS_T:
        t = tl.load(t_ptr + rows, mask=rmask, other=float("-inf")).to(CDT)
        rest = _logaddexp(rest, t)
    ks = tl.arange(0, BLOCK_K)
    kmask = rmask[:, None] & (ks < K)[None, :]
    s = tl.load(s_ptr + rows[:, None] * K + ks[None, :], mask=kmask, other=float("-inf")).to(CDT)
    valid = s != float("-inf")
    loss, inv, _ = _ranked_terms(s, valid, rest, False)
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(rest_ptr + rows, rest, mask=rmask)
    tl.store(inv_ptr + rows, inv, mask=rmask)


# Score form, backward, times grad_output g (per row):
#   ds_j = g (exp(s_j + A_j) - 1) for valid j, A_j = log sum_{k<=j valid} 1/D_k (a forward scan);
#   du_l = g exp(u_l + inv);  dt = g exp(t + inv). Every exponent is <= log K: no overflow.
# Memory plan: reads s, u, and rest/inv/g per row once; writes the gradients once (input dtype).
@triton.jit
def _bwd_kernel(
    go_ptr,
    s_ptr,
    u_ptr,
    t_ptr,
    rest_ptr,
    inv_ptr,
    gs_ptr,
    gu_ptr,
    gt_ptr,
    B,
    K,
    L,
    HAS_U: tl.constexpr,
    HAS_T: tl.constexpr,
    CDT: tl.constexpr,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    NL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    rmask = rows < B
    g = tl.load(go_ptr + rows, mask=rmask, other=0.0).to(CDT)
    rest = tl.load(rest_ptr + rows, mask=rmask, other=0.0).to(CDT)
    inv = tl.load(inv_ptr + rows, mask=rmask, other=float("-inf")).to(CDT)
    ks = tl.arange(0, BLOCK_K)
    kmask = rmask[:, None] & (ks < K)[None, :]
    s = tl.load(s_ptr + rows[:, None] * K + ks[None, :], mask=kmask, other=float("-inf")).to(CDT)
    valid = s != float("-inf")
    _, _, prefix = _ranked_terms(s, valid, rest, True)
    gs = tl.where(valid, g[:, None] * (tl.exp(s + prefix) - 1.0), 0.0)
    tl.store(gs_ptr + rows[:, None] * K + ks[None, :], gs.to(gs_ptr.dtype.element_ty), mask=kmask)
    if HAS_U:
        for lc in range(NL):
            ls = lc * BLOCK_L + tl.arange(0, BLOCK_L)
            msk = rmask[:, None] & (ls < L)[None, :]
            offs = rows[:, None] * L + ls[None, :]
            u = tl.load(u_ptr + offs, mask=msk, other=float("-inf")).to(CDT)
            gu = g[:, None] * tl.exp(u + inv[:, None])
            tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=msk)
    if HAS_T:
        t = tl.load(t_ptr + rows, mask=rmask, other=float("-inf")).to(CDT)
        tl.store(gt_ptr + rows, (g * tl.exp(t + inv)).to(gt_ptr.dtype.element_ty), mask=rmask)


def _cdt(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(K, L):
    bk = triton.next_power_of_2(max(K, 1))
    bl = min(triton.next_power_of_2(max(L, 1)), 1024)
    r = max(1, min(16, 2048 // max(bk, bl)))
    return bk, bl, r


def loss_and_grads(ranked, unranked, log_tail, need_grad):
    """(loss [B], d_ranked [B, K], d_unranked [B, L], d_tail [B]); the last three at unit upstream
    gradient, empty [0] when absent or not needed: the forward kernel, then (need_grad) the backward
    kernel with grad_output 1."""
    s = ranked.contiguous()
    u = None if unranked is None else unranked.contiguous()
    t = None if log_tail is None else log_tail.contiguous()
    B, K = s.shape
    L = 0 if u is None else u.shape[1]
    acc = acc_dtype(s.dtype)
    loss, rest, inv = (torch.empty(B, dtype=acc, device=s.device) for _ in range(3))

    def out(x, shape):
        return torch.empty(shape if need_grad and x is not None else 0, dtype=acc, device=s.device)

    d_r, d_u, d_t = out(s, s.shape), out(u, (B, L)), out(t, B)
    if B == 0:
        return loss, d_r, d_u, d_t
    bk, bl, r = _blocks(K, L)
    grid = (triton.cdiv(B, r),)
    flags = dict(
        HAS_U=u is not None,
        HAS_T=t is not None,
        CDT=_cdt(s.dtype),
        R=r,
        BLOCK_K=bk,
        BLOCK_L=bl,
        NL=triton.cdiv(L, bl),
        num_warps=4,
    )
    u_arg, t_arg = s if u is None else u, s if t is None else t
    _fwd_kernel[grid](s, u_arg, t_arg, loss, rest, inv, B, K, L, **flags)
    if need_grad:
        ones = torch.ones(B, dtype=acc, device=s.device)
        _bwd_kernel[grid](
            ones,
            s,
            u_arg,
            t_arg,
            rest,
            inv,
            d_r,
            d_u if u is not None else d_r,
            d_t if t is not None else d_r,
            B,
            K,
            L,
            **flags,
        )
    return loss, d_r, d_u, d_t


# Embedding form, forward (one row per program). s_k = <q, E[ridx_k]>, u_l = <q, E[uidx_l]>, id -1
# -> -inf; then the score-form math. With NEED_GRAD it also writes what the backward needs, so that
# the backward never recomputes an unranked dot product: coef_j = exp(s_j + A_j) - 1 (the ranked
# score gradient for grad_output 1), uscore_l = u_l (raw; the backward forms exp(u_l + inv)), gq_u =
# sum_l exp(u_l + inv) E[uidx_l], accumulated flash-style: acc = sum_l exp(u_l - m) E_l with a
# running max m, rescaled when m grows, times exp(m + inv) at the end (<= K: no overflow).
# Memory plan: q row and the [BLOCK_L, BLOCK_D] chunk of gathered item rows in registers, never a
# [B, K+L, d] tensor; the ranked rows are gathered in [BLOCK_K, BLOCK_DC] tiles (d in chunks) so
# that the whole ranked score vector stays in registers for the scans. Each item row is read once.
@triton.jit
def _emb_fwd_kernel(
    q_ptr,
    e_ptr,
    ridx_ptr,
    uidx_ptr,
    t_ptr,
    loss_ptr,
    rest_ptr,
    inv_ptr,
    coef_ptr,
    us_ptr,
    gqu_ptr,
    K,
    L,
    D,
    HAS_U: tl.constexpr,
    HAS_T: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    CDT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NDC: tl.constexpr,
    NL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    ridx = tl.load(ridx_ptr + row * K + ks, mask=kmask, other=-1)
    rvalid = ridx >= 0
    rsafe = tl.where(rvalid, ridx, 0)
    s = tl.zeros([BLOCK_K], CDT)
    for cc in range(NDC):
        dc = cc * BLOCK_DC + tl.arange(0, BLOCK_DC)
        dmask = dc < D
        qc = tl.load(q_ptr + row * D + dc, mask=dmask, other=0.0).to(CDT)
        ec = tl.load(
            e_ptr + rsafe[:, None] * D + dc[None, :],
            mask=rvalid[:, None] & dmask[None, :],
            other=0.0,
        ).to(CDT)
        s += tl.sum(ec * qc[None, :], axis=1)
    s = tl.where(rvalid, s, float("-inf"))
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    q = tl.load(q_ptr + row * D + ds, mask=dmask, other=0.0).to(CDT)
    m_u = tl.max(tl.full([BLOCK_L], float("-inf"), CDT), axis=0)
    z_u = tl.sum(tl.zeros([BLOCK_L], CDT), axis=0)
    flags = tl.sum(tl.zeros([BLOCK_L], tl.int32), axis=0)
    acc = tl.zeros([BLOCK_D], CDT)
    if HAS_U:
        for lc in range(NL):
            ls = lc * BLOCK_L + tl.arange(0, BLOCK_L)
            lmask = ls < L
            uidx = tl.load(uidx_ptr + row * L + ls, mask=lmask, other=-1)
            uvalid = uidx >= 0
            usafe = tl.where(uvalid, uidx, 0)
            e = tl.load(
                e_ptr + usafe[:, None] * D + ds[None, :],
                mask=uvalid[:, None] & dmask[None, :],
                other=0.0,
            ).to(CDT)
            u = tl.where(uvalid, tl.sum(e * q[None, :], axis=1), float("-inf"))
            flags = _non_finite(flags, u, 0)
            m_new = tl.maximum(m_u, tl.max(u, axis=0))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale = tl.exp(m_u - safe)
            w = tl.exp(u - safe)
            z_u = z_u * scale + tl.sum(w, axis=0)
            if NEED_GRAD:
                tl.store(us_ptr + row * L + ls, u, mask=lmask)
                acc = acc * scale + tl.sum(w[:, None] * e, axis=0)
            m_u = m_new
    rest = _with_non_finite(tl.where(z_u > 0, m_u + tl.log(z_u), float("-inf")), flags)
    if HAS_T:
        rest = _logaddexp(rest, tl.load(t_ptr + row).to(CDT))
    rest1 = tl.zeros([1], CDT) + rest
    loss, inv, prefix = _ranked_terms(s[None, :], rvalid[None, :], rest1, NEED_GRAD)
    tl.store(loss_ptr + row + tl.arange(0, 1), loss)
    tl.store(rest_ptr + row + tl.arange(0, 1), rest1)
    tl.store(inv_ptr + row + tl.arange(0, 1), inv)
    if NEED_GRAD:
        coef = tl.where(rvalid[None, :], tl.exp(s[None, :] + prefix) - 1.0, 0.0)
        tl.store(coef_ptr + row * K + ks[None, :], coef, mask=kmask[None, :])
        inv_s = tl.sum(inv, axis=0)
        m_safe = tl.where(m_u == float("-inf"), 0.0, m_u)
        gscale = tl.where(m_u == float("-inf"), 0.0, tl.exp(m_safe + inv_s))
        tl.store(gqu_ptr + row * D + ds, acc * gscale, mask=dmask)


# Embedding form, gradients (one row per program), in two uses:
# GATHER (the forward, grad_output 1): grad_q = gq_u + sum_k coef_k E[ridx_k], the row's query
# gradient at unit upstream gradient (the ranked item rows are gathered again, in [BLOCK_KC,
# BLOCK_D] tiles); SCATTER (the backward, grad_output g): grad_E[ridx_k] += g coef_k q and
# grad_E[uidx_l] += g du_l q, du_l = exp(u_l + inv) the unranked score gradients at unit upstream
# gradient; the item rows are only written to, never read. grad_E is float32 (float64) and
# accumulated with atomic adds (relaxed): repeated ids add up correctly, but the addition order
# varies run to run.
# Memory plan: the q row in registers, one [BLOCK, BLOCK_D] tile of item rows at a time.
@triton.jit
def _emb_grad_kernel(
    go_ptr,
    q_ptr,
    e_ptr,
    ridx_ptr,
    uidx_ptr,
    coef_ptr,
    du_ptr,
    gqu_ptr,
    gq_ptr,
    ge_ptr,
    K,
    L,
    D,
    HAS_U: tl.constexpr,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    CDT: tl.constexpr,
    BLOCK_KC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NKC: tl.constexpr,
    NL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(go_ptr + row).to(CDT)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    q = tl.load(q_ptr + row * D + ds, mask=dmask, other=0.0).to(CDT)
    gk = tl.zeros([BLOCK_D], CDT)
    for kc in range(NKC):
        ks = kc * BLOCK_KC + tl.arange(0, BLOCK_KC)
        kmask = ks < K
        idx = tl.load(ridx_ptr + row * K + ks, mask=kmask, other=-1)
        valid = idx >= 0
        safe = tl.where(valid, idx, 0)
        c = tl.load(coef_ptr + row * K + ks, mask=valid, other=0.0).to(CDT)
        m2 = valid[:, None] & dmask[None, :]
        if GATHER:
            e = tl.load(e_ptr + safe[:, None] * D + ds[None, :], mask=m2, other=0.0).to(CDT)
            gk += tl.sum(c[:, None] * e, axis=0)
        if SCATTER:
            tl.atomic_add(
                ge_ptr + safe[:, None] * D + ds[None, :],
                (g * c[:, None] * q[None, :]).to(ge_ptr.dtype.element_ty),
                mask=m2,
                sem="relaxed",
            )
    if SCATTER:
        if HAS_U:
            for lc in range(NL):
                ls = lc * BLOCK_L + tl.arange(0, BLOCK_L)
                lmask = ls < L
                idx = tl.load(uidx_ptr + row * L + ls, mask=lmask, other=-1)
                valid = idx >= 0
                safe = tl.where(valid, idx, 0)
                c = g * tl.load(du_ptr + row * L + ls, mask=valid, other=0.0).to(CDT)
                m2 = valid[:, None] & dmask[None, :]
                tl.atomic_add(
                    ge_ptr + safe[:, None] * D + ds[None, :],
                    (c[:, None] * q[None, :]).to(ge_ptr.dtype.element_ty),
                    mask=m2,
                    sem="relaxed",
                )
    if GATHER:
        gq = tl.load(gqu_ptr + row * D + ds, mask=dmask, other=0.0).to(CDT)
        tl.store(gq_ptr + row * D + ds, (g * (gq + gk)).to(gq_ptr.dtype.element_ty), mask=dmask)


@functools.cache
def _emb_blocks(K, L, D):
    bd = triton.next_power_of_2(max(D, 1))
    bk = triton.next_power_of_2(max(K, 1))
    bdc = max(1, min(bd, 8192 // bk))
    bl = max(16, min(triton.next_power_of_2(max(L, 1)), 8192 // bd))
    bkc = max(16, min(bk, 8192 // bd))
    return bk, bdc, bl, bd, bkc


def _grad_launch(g, q, e, ridx, uidx, coef, du, gqu, gq, ge, *, gather, scatter):
    B, D = q.shape
    K = ridx.shape[1]
    L = 0 if uidx is None else uidx.shape[1]
    _, _, bl, bd, bkc = _emb_blocks(K, L, D)
    _emb_grad_kernel[(B,)](
        g,
        q,
        e,
        ridx,
        ridx if uidx is None else uidx,
        coef,
        coef if du is None else du,
        gqu,
        gq,
        ge,
        K,
        L,
        D,
        HAS_U=uidx is not None and L > 0,
        GATHER=gather,
        SCATTER=scatter,
        CDT=_cdt(q.dtype),
        BLOCK_KC=bkc,
        BLOCK_L=bl,
        BLOCK_D=bd,
        NKC=triton.cdiv(K, bkc),
        NL=triton.cdiv(L, bl),
        num_warps=4,
    )


def _ids(idx):
    return None if idx is None else idx.to(torch.int64).contiguous()


def emb_forward(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad):
    """(loss [B], d_ranked [B, K], d_unranked [B, L], d_tail [B], grad_query [B, d]), the last four
    at unit upstream gradient (empty [0] when absent or not needed), float32 (float64 for float64
    input).

    The fused forward kernel gives the loss, the ranked score gradients, the raw unranked scores and
    the unranked part of grad_query; the gradient kernel (GATHER) adds the ranked part."""
    check_ids(ranked_idx, unranked_idx, rows, item.shape[0], query.shape[0])
    q, ridx, uidx, t = take_rows(rows, query, _ids(ranked_idx), _ids(unranked_idx), log_tail)
    q, e = q.contiguous(), item.contiguous()
    ridx, uidx = ridx.contiguous(), None if uidx is None else uidx.contiguous()
    t = None if t is None else t.contiguous()
    B, D = q.shape
    K = ridx.shape[1]
    L = 0 if uidx is None else uidx.shape[1]
    acc = acc_dtype(q.dtype)
    dev = q.device
    loss, rest, inv = (torch.empty(B, dtype=acc, device=dev) for _ in range(3))

    def out(present, *shape):
        return torch.empty(shape if need_grad and present else 0, dtype=acc, device=dev)

    coef, us, d_t, gqu = (
        out(True, B, K),
        out(uidx is not None, B, L),
        out(t is not None, B),
        out(True, B, D),
    )
    if B == 0:
        return loss, coef, us, d_t, gqu
    bk, bdc, bl, bd, _ = _emb_blocks(K, L, D)
    _emb_fwd_kernel[(B,)](
        q,
        e,
        ridx,
        ridx if uidx is None else uidx,
        q if t is None else t,
        loss,
        rest,
        inv,
        coef if need_grad else loss,
        us if need_grad and L > 0 else loss,
        gqu if need_grad else loss,
        K,
        L,
        D,
        HAS_U=uidx is not None and L > 0,
        HAS_T=t is not None,
        NEED_GRAD=bool(need_grad),
        CDT=_cdt(q.dtype),
        BLOCK_K=bk,
        BLOCK_DC=bdc,
        BLOCK_L=bl,
        BLOCK_D=bd,
        NDC=triton.cdiv(D, bdc),
        NL=triton.cdiv(L, bl),
        num_warps=4,
    )
    if not need_grad:
        return loss, coef, us, d_t, gqu
    gq = torch.empty((B, D), dtype=acc, device=dev)
    ones = torch.ones(B, dtype=acc, device=dev)
    _grad_launch(ones, q, e, ridx, uidx, coef, None, gqu, gq, gq, gather=True, scatter=False)
    d_u = torch.exp(us + inv[:, None]) if uidx is not None else us
    d_t = torch.exp(t.to(acc) + inv) if t is not None else d_t
    return loss, coef, d_u, d_t, gq


def _scatter_deterministic(ge, g, q, ridx, d_ranked, uidx, d_unranked, max_entries=2**19):
    """grad_E[i] += sum_{(b, j): idx_bj = i} g_b d_bj q_b with index_add_ (sort-based and
    deterministic under torch.use_deterministic_algorithms), over row chunks of at most max_entries
    entries taken in
    a fixed order, so that the [entries, d] source never exceeds max_entries * d values."""
    B = q.shape[0]
    parts = [(ridx, d_ranked)]
    if uidx is not None and uidx.shape[1] > 0:
        parts.append((uidx, d_unranked))
    qf = q.to(ge.dtype)
    for idx, d in parts:
        c = d * g[:, None]
        M = idx.shape[1]
        step = max(1, max_entries // max(M, 1))
        for b0 in range(0, B, step):
            ids = idx[b0 : b0 + step]
            cc = torch.where(ids >= 0, c[b0 : b0 + step], torch.zeros_like(c[b0 : b0 + step]))
            src = (cc[:, :, None] * qf[b0 : b0 + step, None, :]).reshape(-1, qf.shape[1])
            ge.index_add_(0, ids.clamp_min(0).reshape(-1), src.to(ge.dtype))


def emb_backward(
    grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked, grad_query
):
    """(grad_query [n_rows, d], grad_item [N, d]) for the upstream grad [B], float32 (float64).

    grad_item is accumulated with atomic adds by default (not bitwise reproducible run to run);
    under torch.use_deterministic_algorithms(True) it is summed by a chunked, sort-based index_add_
    instead (reproducible, slower, at most 2^19 * d extra values).
    """
    q, ridx, uidx = take_rows(rows, query, _ids(ranked_idx), _ids(unranked_idx))
    q, ridx = q.contiguous(), ridx.contiguous()
    uidx = None if uidx is None else uidx.contiguous()
    acc = grad_query.dtype
    g = grad.to(acc).contiguous()
    ge = torch.zeros(item.shape, dtype=acc, device=item.device)
    if q.shape[0] > 0:
        if torch.are_deterministic_algorithms_enabled():
            _scatter_deterministic(ge, g, q, ridx, d_ranked, uidx, d_unranked)
        else:
            _grad_launch(
                g,
                q,
                item.contiguous(),
                ridx,
                uidx,
                d_ranked,
                d_unranked,
                g,
                g,
                ge,
                gather=False,
                scatter=True,
            )
    return add_rows(g[:, None] * grad_query, rows, query.shape[0]), ge
