"""Triton kernels of the full-catalog log-tail (kdfast::full_catalog_log_tail) and its backward.

Math (see kdfast/ops/full_catalog/reference.py): S_bj = clamp(<u_b, v_j>, -c, c);
    log_tail_b = log sum_{j not in X_b} exp(S_bj)
    G_bj = g_b exp(S_bj - log_tail_b) [j not in X_b] [-c <= <u_b, v_j> <= c]
    grad_user = G @ V,  grad_item = G^T @ U
X_b comes in as a canonical CSR (ids sorted within each row, no repeats). Every tile finds, per row,
the first excluded id inside the tile by binary search and then walks the row's ids that fall in the
tile, so exclusions cost O(log nnz_b + hits) per row and tile and no dense mask exists.
Deterministic: every sum has a fixed order (partial results per item split are combined in torch).
Imported on first use by kdfast.ops.full_catalog (so TRITON_INTERPRET, when set, applies). Results
in float32 (float64 for float64 inputs), the op's backend contract.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._core import backend
from ..._core.numerics import acc_dtype


@triton.jit
def excluded_tile(
    ex_indptr, ex_idx, rows, row_ok, n0, BM: tl.constexpr, BN: tl.constexpr, LOG_ITERS: tl.constexpr
):
    # [BM, BN] bool: is item n0 + n excluded for row rows[m]?
    # Binary search for the first id >= n0 in each row's sorted ids, then mark ids < n0 + BN one by
    # one (the loop runs max over the rows of the number of exclusions inside this tile).
    lo = tl.load(ex_indptr + rows, mask=row_ok, other=0)
    end = tl.load(ex_indptr + rows + 1, mask=row_ok, other=0)
    hi = end
    for _ in range(LOG_ITERS):
        active = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(ex_idx + mid, mask=active, other=0)
        right = active & (val < n0)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (val >= n0), mid, hi)
    ptr = lo
    stop = n0 + BN
    cols = n0 + tl.arange(0, BN).to(tl.int64)
    cur = tl.where(ptr < end, tl.load(ex_idx + ptr, mask=ptr < end, other=0), stop)
    hit = tl.zeros([BM, BN], dtype=tl.int32)
    while tl.max((cur < stop).to(tl.int32), axis=0) > 0:
        hit = hit | (cur[:, None] == cols[None, :]).to(tl.int32)
        ptr = ptr + (cur < stop).to(tl.int64)
        cur = tl.where(ptr < end, tl.load(ex_idx + ptr, mask=ptr < end, other=0), stop)
    return hit != 0


@triton.jit
def fwd_tile(
    u,
    m,
    s,
    V,
    ex_indptr,
    ex_idx,
    rows,
    row_ok,
    n0,
    stop,
    D,
    clamp,
    dk,
    d_ok,
    BM: tl.constexpr,
    BN: tl.constexpr,
    LOG_ITERS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # Score tile [BM, BN] = U_rows @ V[n0:n0+BN]^T, clamped, excluded -> -inf, folded into the
    # running (max m, sum s) per row.
    cols = n0 + tl.arange(0, BN).to(tl.int64)
    col_ok = cols < stop
    v = tl.load(
        V + cols[:, None] * D + dk[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0
    ).to(ACC)
    sc = tl.dot(u, tl.trans(v), input_precision=PREC, out_dtype=ACC)
    sc = tl.minimum(tl.maximum(sc, -clamp), clamp)
    ex = excluded_tile(ex_indptr, ex_idx, rows, row_ok, n0, BM, BN, LOG_ITERS)
    ok = row_ok[:, None] & col_ok[None, :] & (ex == 0)
    sc = tl.where(ok, sc, float("-inf"))
    new_m = tl.maximum(m, tl.max(sc, axis=1))
    safe = tl.where(new_m == float("-inf"), 0.0, new_m)
    s = s * tl.exp(m - safe) + tl.sum(tl.exp(sc - safe[:, None]), axis=1)
    return new_m, s


@triton.jit
def fwd_kernel(
    U,
    V,
    ex_indptr,
    ex_idx,
    M_out,
    S_out,
    B,
    I,
    D,
    clamp,
    per_split,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    LOG_ITERS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    # One program: BM user rows x one split of per_split items. Reads U[BM, D] once and V in [BN, D]
    # tiles; the [BM, BN] score tile lives in registers; writes a running (max, sum exp) pair per
    # row for this split to M_out/S_out [n_split, B] (combined in torch). WHILE_LOOP: the
    # interpreter cannot run range() over a runtime bound, so it takes an equivalent while loop.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < B
    dk = tl.arange(0, BD)
    d_ok = dk < D
    u = tl.load(
        U + rows[:, None] * D + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    ).to(ACC)
    m = tl.full([BM], float("-inf"), ACC)
    s = tl.zeros([BM], ACC)
    start = pid_s.to(tl.int64) * per_split
    stop = tl.minimum(start + per_split, I)
    n_t = per_split // BN
    if WHILE_LOOP:
        t = pid_s * 0
        while t < n_t:
            m, s = fwd_tile(
                u,
                m,
                s,
                V,
                ex_indptr,
                ex_idx,
                rows,
                row_ok,
                start + t * BN,
                stop,
                D,
                clamp,
                dk,
                d_ok,
                BM,
                BN,
                LOG_ITERS,
                ACC,
                PREC,
            )
            t += 1
    else:
        for t in range(0, n_t):
            m, s = fwd_tile(
                u,
                m,
                s,
                V,
                ex_indptr,
                ex_idx,
                rows,
                row_ok,
                start + t * BN,
                stop,
                D,
                clamp,
                dk,
                d_ok,
                BM,
                BN,
                LOG_ITERS,
                ACC,
                PREC,
            )
    tl.store(M_out + pid_s * B + rows, m, mask=row_ok)
    tl.store(S_out + pid_s * B + rows, s, mask=row_ok)


@triton.jit
def grad_tile(
    u,
    v,
    g,
    lt,
    rows,
    row_ok,
    cols,
    col_ok,
    ex_indptr,
    ex_idx,
    n0,
    clamp,
    BM: tl.constexpr,
    BN: tl.constexpr,
    LOG_ITERS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # G tile [BM, BN] = g_b exp(S_bj - lt_b) on kept entries (not excluded, not clamped), else 0.
    raw = tl.dot(u, tl.trans(v), input_precision=PREC, out_dtype=ACC)
    ex = excluded_tile(ex_indptr, ex_idx, rows, row_ok, n0, BM, BN, LOG_ITERS)
    keep = row_ok[:, None] & col_ok[None, :] & (ex == 0) & (raw >= -clamp) & (raw <= clamp)
    p = tl.exp(tl.where(keep, raw - lt[:, None], float("-inf"))) * g[:, None]
    return tl.where(keep, p, 0.0)


@triton.jit
def bwd_user_tile(
    acc,
    u,
    g,
    lt,
    V,
    rows,
    row_ok,
    n0,
    stop,
    D,
    dk,
    d_ok,
    ex_indptr,
    ex_idx,
    clamp,
    BM: tl.constexpr,
    BN: tl.constexpr,
    LOG_ITERS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    cols = n0 + tl.arange(0, BN).to(tl.int64)
    col_ok = cols < stop
    v = tl.load(
        V + cols[:, None] * D + dk[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0
    ).to(ACC)
    p = grad_tile(
        u,
        v,
        g,
        lt,
        rows,
        row_ok,
        cols,
        col_ok,
        ex_indptr,
        ex_idx,
        n0,
        clamp,
        BM,
        BN,
        LOG_ITERS,
        ACC,
        PREC,
    )
    return acc + tl.dot(p, v, input_precision=PREC, out_dtype=ACC)


@triton.jit
def bwd_user_kernel(
    U,
    V,
    G,
    LT,
    ex_indptr,
    ex_idx,
    GU_out,
    B,
    I,
    D,
    clamp,
    per_split,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    LOG_ITERS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    # One program: BM user rows x one item split; recomputes the score tiles, accumulates
    # G_tile @ V_tile in a [BM, BD] register block, writes it to GU_out[pid_s] ([n_split, B, D]).
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < B
    dk = tl.arange(0, BD)
    d_ok = dk < D
    u = tl.load(
        U + rows[:, None] * D + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    ).to(ACC)
    g = tl.load(G + rows, mask=row_ok, other=0.0).to(ACC)
    lt = tl.load(LT + rows, mask=row_ok, other=0.0).to(ACC)
    acc = tl.zeros([BM, BD], ACC)
    start = pid_s.to(tl.int64) * per_split
    stop = tl.minimum(start + per_split, I)
    n_t = per_split // BN
    if WHILE_LOOP:
        t = pid_s * 0
        while t < n_t:
            acc = bwd_user_tile(
                acc,
                u,
                g,
                lt,
                V,
                rows,
                row_ok,
                start + t * BN,
                stop,
                D,
                dk,
                d_ok,
                ex_indptr,
                ex_idx,
                clamp,
                BM,
                BN,
                LOG_ITERS,
                ACC,
                PREC,
            )
            t += 1
    else:
        for t in range(0, n_t):
            acc = bwd_user_tile(
                acc,
                u,
                g,
                lt,
                V,
                rows,
                row_ok,
                start + t * BN,
                stop,
                D,
                dk,
                d_ok,
                ex_indptr,
                ex_idx,
                clamp,
                BM,
                BN,
                LOG_ITERS,
                ACC,
                PREC,
            )
    out = GU_out + pid_s.to(tl.int64) * B * D + rows[:, None] * D + dk[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def bwd_item_tile(
    acc,
    v,
    U,
    G,
    LT,
    m0,
    B,
    D,
    dk,
    d_ok,
    cols,
    col_ok,
    n0,
    ex_indptr,
    ex_idx,
    clamp,
    BM: tl.constexpr,
    BN: tl.constexpr,
    LOG_ITERS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    rows = m0 + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < B
    u = tl.load(
        U + rows[:, None] * D + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    ).to(ACC)
    g = tl.load(G + rows, mask=row_ok, other=0.0).to(ACC)
    lt = tl.load(LT + rows, mask=row_ok, other=0.0).to(ACC)
    p = grad_tile(
        u,
        v,
        g,
        lt,
        rows,
        row_ok,
        cols,
        col_ok,
        ex_indptr,
        ex_idx,
        n0,
        clamp,
        BM,
        BN,
        LOG_ITERS,
        ACC,
        PREC,
    )
    return acc + tl.dot(tl.trans(p), u, input_precision=PREC, out_dtype=ACC)


@triton.jit
def bwd_item_kernel(
    U,
    V,
    G,
    LT,
    ex_indptr,
    ex_idx,
    GI_out,
    B,
    I,
    D,
    clamp,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    LOG_ITERS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    # One program: BN items; loops over all user blocks, recomputing the score tiles, accumulates
    # G_tile^T @ U_tile in a [BN, BD] register block and writes grad_item rows once.
    pid_n = tl.program_id(0)
    n0 = pid_n.to(tl.int64) * BN
    cols = n0 + tl.arange(0, BN).to(tl.int64)
    col_ok = cols < I
    dk = tl.arange(0, BD)
    d_ok = dk < D
    v = tl.load(
        V + cols[:, None] * D + dk[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0
    ).to(ACC)
    acc = tl.zeros([BN, BD], ACC)
    n_t = (B + BM - 1) // BM
    if WHILE_LOOP:
        t = pid_n * 0
        while t < n_t:
            acc = bwd_item_tile(
                acc,
                v,
                U,
                G,
                LT,
                t * BM,
                B,
                D,
                dk,
                d_ok,
                cols,
                col_ok,
                n0,
                ex_indptr,
                ex_idx,
                clamp,
                BM,
                BN,
                LOG_ITERS,
                ACC,
                PREC,
            )
            t += 1
    else:
        for t in range(0, n_t):
            acc = bwd_item_tile(
                acc,
                v,
                U,
                G,
                LT,
                t * BM,
                B,
                D,
                dk,
                d_ok,
                cols,
                col_ok,
                n0,
                ex_indptr,
                ex_idx,
                clamp,
                BM,
                BN,
                LOG_ITERS,
                ACC,
                PREC,
            )
    tl.store(GI_out + cols[:, None] * D + dk[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])


def _config(user_emb, item_emb, indptr):
    """Tiles, exclusion-search depth, accumulator and dot precision.

    Precision: float16/bfloat16 inputs take "tf32" dots (their values are exact in tf32, so the
    score products are exact; only the backward's probability matrix is rounded to tf32, below the
    precision of the half-precision gradient returned); float32 takes "tf32" only when
    torch.backends.cuda.matmul.allow_tf32 is set, else exact "ieee" dots; float64 is always exact.
    Tiles: sm_90 compiles of every variant (bench/compile_triton.py) showed the exact-precision
    (FMA) dots at 64 x 64 tiles collapsing to 32 registers and 3-6 KB of stack per thread, and 32 x
    64 tiles (float32) or 32 x 32 (float64) compiling without spills; tensor-core (tf32) dots keep
    64 x 64 up to d = 64.
    """
    d = user_emb.shape[1]
    bd = max(16, triton.next_power_of_2(d))
    f64 = user_emb.dtype == torch.float64
    acc = tl.float64 if f64 else tl.float32
    if f64:
        prec = "ieee"
    elif user_emb.dtype in (torch.float16, torch.bfloat16):
        prec = "tf32"
    else:
        prec = "tf32" if (user_emb.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    if backend.interpreting():
        bm, bn = 16, 16
    elif f64:
        bm, bn = 32, 32
    elif prec == "ieee":
        bm, bn = 32, 64
    else:
        bm, bn = (64, 64) if bd <= 64 else (32, 32)
    max_len = int((indptr[1:] - indptr[:-1]).max()) if indptr.numel() > 1 else 0
    log_iters = max(1, math.ceil(math.log2(max_len + 1)) + 1)
    return bm, bn, bd, log_iters, acc, prec


def _splits(n_rows, n_items, bm, bn, device):
    """Item splits so that the grid has enough programs: (n_split, items per split, multiple of
    bn)."""
    grid_m = triton.cdiv(n_rows, bm)
    n_tiles = triton.cdiv(n_items, bn)
    target = 4 * (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 1
    )
    n_split = max(1, min(n_tiles, triton.cdiv(target, grid_m)))
    per = triton.cdiv(n_tiles, n_split) * bn
    return triton.cdiv(n_items, per), per


def _nonempty(indices):
    """A 1-element stand-in for an empty id list (never read: every row's range is empty)."""
    return indices if indices.numel() else torch.zeros(1, dtype=torch.int64, device=indices.device)


def _clamp_arg(clamp):
    return float(clamp) if math.isfinite(clamp) else 3.0e38


def log_tail(user_emb, item_emb, indptr, indices, clamp):
    """[B] log-tail (float32; float64 for float64 inputs); indptr/indices a canonical CSR of
    exclusions."""
    n_rows, d = user_emb.shape
    n_items = item_emb.shape[0]
    bm, bn, bd, log_iters, acc, prec = _config(user_emb, item_emb, indptr)
    n_split, per = _splits(n_rows, n_items, bm, bn, user_emb.device)
    out_dt = acc_dtype(user_emb.dtype)
    indices = _nonempty(indices)
    m = torch.empty((n_split, n_rows), dtype=out_dt, device=user_emb.device)
    s = torch.empty_like(m)
    fwd_kernel[(triton.cdiv(n_rows, bm), n_split)](
        user_emb,
        item_emb,
        indptr,
        indices,
        m,
        s,
        n_rows,
        n_items,
        d,
        _clamp_arg(clamp),
        per,
        BM=bm,
        BN=bn,
        BD=bd,
        LOG_ITERS=log_iters,
        ACC=acc,
        PREC=prec,
        WHILE_LOOP=backend.interpreting(),
    )
    mx = m.amax(0)
    safe = torch.where(torch.isinf(mx) & (mx < 0), torch.zeros_like(mx), mx)
    return torch.log((s * torch.exp(m - safe)).sum(0)) + safe


def log_tail_backward(grad, lt, user_emb, item_emb, indptr, indices, clamp):
    """(grad_user [B, d], grad_item [I, d]), float32 (float64 for float64 inputs)."""
    n_rows, d = user_emb.shape
    n_items = item_emb.shape[0]
    bm, bn, bd, log_iters, acc, prec = _config(user_emb, item_emb, indptr)
    n_split, per = _splits(n_rows, n_items, bm, bn, user_emb.device)
    acc_dt = acc_dtype(user_emb.dtype)
    indices = _nonempty(indices)
    grad = grad.to(acc_dt).contiguous()
    lt = lt.to(acc_dt).contiguous()
    gu = torch.empty((n_split, n_rows, d), dtype=acc_dt, device=user_emb.device)
    gi = torch.empty((n_items, d), dtype=acc_dt, device=user_emb.device)
    c = _clamp_arg(clamp)
    bwd_user_kernel[(triton.cdiv(n_rows, bm), n_split)](
        user_emb,
        item_emb,
        grad,
        lt,
        indptr,
        indices,
        gu,
        n_rows,
        n_items,
        d,
        c,
        per,
        BM=bm,
        BN=bn,
        BD=bd,
        LOG_ITERS=log_iters,
        ACC=acc,
        PREC=prec,
        WHILE_LOOP=backend.interpreting(),
    )
    bwd_item_kernel[(triton.cdiv(n_items, bn),)](
        user_emb,
        item_emb,
        grad,
        lt,
        indptr,
        indices,
        gi,
        n_rows,
        n_items,
        d,
        c,
        BM=bm,
        BN=bn,
        BD=bd,
        LOG_ITERS=log_iters,
        ACC=acc,
        PREC=prec,
        WHILE_LOOP=backend.interpreting(),
    )
    return gu.sum(0), gi
