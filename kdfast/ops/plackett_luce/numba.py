"""numba backend of the relaxed Plackett-Luce loss: the math of the cpp kernels
(csrc/plackett_luce.h) compiled by numba, with the signatures of the op's backend contract
(kdfast.ops.plackett_luce). Inputs are float32 or float64 CPU tensors; results come in the same
dtype; nothing passed in is modified. The arithmetic runs in float64 whatever the input (results
are rounded once, at the end).

Math, per row (s = ranked scores in teacher order, u = unranked scores, t = log of a tail mass; -inf
entries are padding; a NaN among s, u or t makes the row's loss NaN, else a +inf among u or t makes
it +inf, a +inf among s NaN; a row without a valid ranked score has loss 0 and gradient 0):
    log D_k = logaddexp( revlogcumsumexp(s)_k , rest ),   rest = logsumexp(u, t)
    loss    = sum_{k valid} (log D_k - s_k)
    A_j     = log sum_{k<=j, k valid} 1/D_k
    dL/ds_j = exp(s_j + A_j) - 1  (valid j),  dL/du_l = exp(u_l + A_K),  dL/dt = exp(t + A_K)
Two ways, the same math: with one shift c = max(valid s, rest) for the row (one exp and one log per
entry) when every shifted suffix sum is >= 1e-290, else running (max, sum) scans in log space (exact
at any scale).

Memory plan: rows are independent; each parallel iteration takes a run of rows with scratch of K
values (twice), plus, for the embedding form, the row's K + L scores and d partial sums. The
embedding form's item gradient is a counting sort of the entries by item (in (row, position)
order), then each item row sums its entries in that order: no atomics, the same bits for any thread
count. Compiled on first use for each dtype and cached on disk (numba cache=True).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ..._core import backend
from .rows import check_ids

NINF = -np.inf
FLOOR = 1e-290  # smallest shifted suffix sum of the one-shift way (float64 math)
SCORE_ROWS = 64  # rows per parallel iteration, score form
EMB_ROWS = 16  # and embedding form


# exp(y) = 2^n exp(r), n = round(y / ln 2), r = y - n ln 2 (ln 2 in two parts: n ln2_hi is exact)
LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
ROUND = 6755399441055744.0  # 1.5 * 2^52: adding and subtracting it rounds to an integer


@njit(cache=True, nogil=True, fastmath={"contract"})
def _exp_shift(x, shift, out, n_buf):
    """out[i] = exp(x[i] + shift) in float64 for i < len(x), in loops that LLVM vectorises (the
    scalar libm exp is the cost of this op otherwise): |r| <= ln(2) / 2 and the degree-13 Taylor
    polynomial of exp(r) (truncation below 1e-17), then n added to the exponent bits. Results below
    exp(-708) are 0 (the exact ones are subnormal), above exp(709) +inf; NaN stays NaN. Scratch
    n_buf: len(x) int64."""
    m = x.shape[0]
    for i in range(m):
        y = np.float64(x[i]) + shift
        y = y if y > -708.0 else -708.0  # NaN too: fixed below
        y = y if y < 709.0 else 709.0
        n = (y * LOG2E + ROUND) - ROUND  # round to nearest (libm's floor would not vectorise)
        r = (y - n * LN2_HI) - n * LN2_LO
        p = 1.6059043836821613e-10
        p = p * r + 2.08767569878681e-09
        p = p * r + 2.505210838544172e-08
        p = p * r + 2.755731922398589e-07
        p = p * r + 2.7557319223985893e-06
        p = p * r + 2.48015873015873e-05
        p = p * r + 0.0001984126984126984
        p = p * r + 0.001388888888888889
        p = p * r + 0.008333333333333333
        p = p * r + 0.041666666666666664
        p = p * r + 0.16666666666666666
        p = p * r + 0.5
        p = p * r + 1.0
        out[i] = p * r + 1.0
        n_buf[i] = np.int64(n)
    bits = out[:m].view(np.int64)
    for i in range(m):
        bits[i] += n_buf[i] << 52
    for i in range(m):  # selects, not branches: the loop vectorises
        y = np.float64(x[i]) + shift
        v = out[i]
        v = 0.0 if y < -708.0 else v
        v = np.inf if y > 709.0 else v
        out[i] = v if y == y else np.nan


@njit(cache=True, nogil=True)
def _logaddexp(a, b):
    mx = a if a > b else b
    if mx == NINF:
        return mx
    mn = b if a > b else a
    return mx + np.log1p(np.exp(mn - mx))


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _sum(x, n):
    """x[0] + ... + x[n - 1] (vectorised; the order is the compiled code's, fixed)."""
    z = 0.0
    for i in range(n):
        z += x[i]
    return z


@njit(cache=True, nogil=True)
def _log_rest(u, t, has_t, buf, n_buf):
    """log(sum_l exp(u_l) + exp(t)) over the entries that are not -inf: -inf when there are none,
    NaN when one is NaN, else +inf when one is +inf. Scratch buf, n_buf: len(u) each."""
    L = u.shape[0]
    # the maximum and the NaN count in four independent chains (selects, no branches)
    m0 = m1 = m2 = m3 = NINF
    nan = 0
    i = 0
    while i + 4 <= L:
        x0, x1 = np.float64(u[i]), np.float64(u[i + 1])
        x2, x3 = np.float64(u[i + 2]), np.float64(u[i + 3])
        m0 = x0 if x0 > m0 else m0
        m1 = x1 if x1 > m1 else m1
        m2 = x2 if x2 > m2 else m2
        m3 = x3 if x3 > m3 else m3
        nan += (x0 != x0) + (x1 != x1) + (x2 != x2) + (x3 != x3)
        i += 4
    for j in range(i, L):
        x = np.float64(u[j])
        m0 = x if x > m0 else m0
        nan += x != x
    m = max(max(m0, m1), max(m2, m3))
    if has_t:
        nan += t != t
        m = t if t > m else m
    if nan:
        return np.nan
    if m == NINF or m == np.inf:
        return m
    _exp_shift(u, -m, buf, n_buf)
    z = _sum(buf, L)
    if has_t:
        z += np.exp(t - m)
    return m + np.log(z)


@njit(cache=True, nogil=True)
def _ranked_row(s, rest, e, r, n_buf, gs, want):
    """(loss, A_K) of one row of ranked scores s given log(rest mass); with want, gs <- dL/ds.
    Scratch e, r: K float64 each, n_buf: K int64."""
    K = s.shape[0]
    c = rest
    n_valid = 0
    for k in range(K):
        x = np.float64(s[k])
        if x > c:
            c = x
        if x != NINF:
            n_valid += 1
    if n_valid == 0:
        if want:
            for k in range(K):
                gs[k] = 0
        return 0.0, NINF
    fast = np.isfinite(c)
    if fast:
        _exp_shift(s, -c, e, n_buf)
        acc = np.exp(rest - c)
        for k in range(K - 1, -1, -1):
            acc += e[k]
            r[k] = acc
        for k in range(K):
            if s[k] != NINF and not (r[k] >= FLOOR):
                fast = False
                break
    if fast:
        total = 0.0
        acc = 0.0
        for k in range(K):
            if s[k] != NINF:
                total += c + np.log(r[k]) - np.float64(s[k])
                acc += 1.0 / r[k]
            r[k] = acc  # P_k = sum_{j<=k valid} 1 / r_j
        if want:
            for k in range(K):
                gs[k] = 0.0 if s[k] == NINF else e[k] * r[k] - 1.0
        return total, np.log(r[K - 1]) - c
    # log D_k by a running (max, sum) suffix scan
    mx = NINF
    z = 0.0
    for k in range(K - 1, -1, -1):
        x = np.float64(s[k])
        if x == NINF:
            r[k] = 0.0
            continue
        if x > mx:
            z = z * np.exp(mx - x) + 1.0
            mx = x
        else:
            z += np.exp(x - mx)
        r[k] = _logaddexp(mx + np.log(z), rest)
    total = 0.0
    am = NINF
    az = 0.0
    for k in range(K):
        x = np.float64(s[k])
        if x == NINF:
            if want:
                gs[k] = 0
            continue
        total += r[k] - x
        a = -r[k]
        if a > am:
            az = az * np.exp(am - a) + 1.0
            am = a
        else:
            az += np.exp(a - am)
        if want:
            gs[k] = np.exp(x + am + np.log(az)) - 1.0
    return total, am + np.log(az)


@njit(parallel=True, cache=True, nogil=True)
def _scores(s, u, t, has_t, want, loss, d_r, d_u, d_t):
    B, K = s.shape
    L = u.shape[1]
    n_runs = (B + SCORE_ROWS - 1) // SCORE_ROWS
    for run in prange(n_runs):
        e = np.empty(K)
        r = np.empty(K)
        buf = np.empty(L)
        n_buf = np.empty(max(K, L), np.int64)
        for b in range(run * SCORE_ROWS, min(B, (run + 1) * SCORE_ROWS)):
            tb = np.float64(t[b]) if has_t else 0.0
            rest = _log_rest(u[b], tb, has_t, buf, n_buf)
            value, inv = _ranked_row(s[b], rest, e, r, n_buf, d_r[b], want)
            loss[b] = value
            if want:
                _exp_shift(u[b], inv, buf, n_buf)
                for l in range(L):
                    d_u[b, l] = buf[l]
                if has_t:
                    d_t[b] = np.exp(tb + inv)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot(a, b):
    """<a, b> in float64 (vectorised: the summation order is the compiled code's, fixed)."""
    acc = 0.0
    for c in range(a.shape[0]):
        acc += np.float64(a[c]) * np.float64(b[c])
    return acc


@njit(cache=True, nogil=True, fastmath={"contract"})
def _axpy(acc, w, x):
    for c in range(acc.shape[0]):
        acc[c] += w * np.float64(x[c])


@njit(parallel=True, cache=True, nogil=True)
def _emb_forward(q, e, rows, has_rows, ri, ui, t, has_t, want, loss, d_r, d_u, d_t, gq):
    B = loss.shape[0]
    K, L = ri.shape[1], ui.shape[1]
    d = q.shape[1]
    n_runs = (B + EMB_ROWS - 1) // EMB_ROWS
    for run in prange(n_runs):
        sc = np.empty(K)
        su = np.empty(L)
        eb = np.empty(K)
        rb = np.empty(K)
        buf = np.empty(L)
        n_buf = np.empty(max(K, L), np.int64)
        acc = np.empty(d)
        for b in range(run * EMB_ROWS, min(B, (run + 1) * EMB_ROWS)):
            qr = rows[b] if has_rows else b
            qb = q[qr]
            for j in range(K):
                i = ri[qr, j]
                sc[j] = NINF if i < 0 else _dot(qb, e[i])
            for j in range(L):
                i = ui[qr, j]
                su[j] = NINF if i < 0 else _dot(qb, e[i])
            tb = np.float64(t[qr]) if has_t else 0.0
            rest = _log_rest(su, tb, has_t, buf, n_buf)
            value, inv = _ranked_row(sc, rest, eb, rb, n_buf, d_r[b], want)
            loss[b] = value
            if not want:
                continue
            acc[:] = 0.0
            for j in range(K):
                i = ri[qr, j]
                w = np.float64(d_r[b, j])
                if i >= 0 and w != 0:
                    _axpy(acc, w, e[i])
            _exp_shift(su, inv, buf, n_buf)
            for j in range(L):
                d_u[b, j] = buf[j]
                i = ui[qr, j]
                w = np.float64(d_u[b, j])
                if i >= 0 and w != 0:
                    _axpy(acc, w, e[i])
            if has_t:
                d_t[b] = np.exp(tb + inv)
            for c in range(d):
                gq[b, c] = acc[c]


@njit(cache=True, nogil=True)
def _entries(g, rows, has_rows, ri, ui, d_r, d_u, counts, src, w, place):
    """The item-gradient entries (row b, position j) with item i >= 0 and weight g_b ds_bj != 0, in
    (b, j) order (ranked, then unranked): counted per item (counts[i + 1]) or, with place, written
    at counts[i]++ (src: the query row, w: the weight)."""
    B = g.shape[0]
    K, L = ri.shape[1], ui.shape[1]
    for b in range(B):
        gb = np.float64(g[b])
        if gb == 0:
            continue
        qr = rows[b] if has_rows else b
        for j in range(K + L):
            i = ri[qr, j] if j < K else ui[qr, j - K]
            wt = np.float64(d_r[b, j]) if j < K else np.float64(d_u[b, j - K])
            if i < 0 or wt == 0:
                continue
            if place:
                at = counts[i]
                src[at] = qr
                w[at] = gb * wt
                counts[i] = at + 1
            else:
                counts[i + 1] += 1


@njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def _emb_backward(g, q, rows, has_rows, ri, ui, d_r, d_u, gqb, grad_q, grad_e):
    B = g.shape[0]
    d = q.shape[1]
    N = grad_e.shape[0]
    for b in range(B):  # B x d work: sequential keeps repeated rows in b order
        qr = rows[b] if has_rows else b
        gb = g[b]
        for c in range(d):
            grad_q[qr, c] += gb * gqb[b, c]
    if N == 0:
        return
    counts = np.zeros(N + 1, np.int64)
    _entries(g, rows, has_rows, ri, ui, d_r, d_u, counts, np.empty(0, np.int64), np.empty(0), False)
    for i in range(N):
        counts[i + 1] += counts[i]
    start = counts[:N].copy()
    src = np.empty(counts[N], np.int64)
    w = np.empty(counts[N], np.float64)
    _entries(g, rows, has_rows, ri, ui, d_r, d_u, start, src, w, True)
    for i in prange(N):
        for at in range(counts[i], counts[i + 1]):
            wt = w[at]
            qr = src[at]
            for c in range(d):
                grad_e[i, c] += wt * q[qr, c]


# ------------------------------------------------------------------------------ backend functions
def _np(x):
    return x.detach().contiguous().numpy()


def _or_empty(x, shape, dtype):
    return torch.empty(shape, dtype=dtype) if x is None else x.detach().contiguous()


def loss_and_grads(ranked, unranked, log_tail, need_grad):
    """(loss [B], d_ranked [B, K], d_unranked [B, L], d_tail [B]); the last three at unit upstream
    gradient, empty [0] when absent or not needed."""
    s = ranked.detach().contiguous()
    B, K = s.shape
    dt = s.dtype
    u = _or_empty(unranked, (B, 0), dt)
    t = _or_empty(log_tail, (0,), dt)
    loss = torch.empty(B, dtype=dt)
    d_r = torch.empty((B, K) if need_grad else (B, 0), dtype=dt)
    d_u = torch.empty((B, u.shape[1]) if need_grad else (B, 0), dtype=dt)
    d_t = torch.empty(B if need_grad and log_tail is not None else 0, dtype=dt)
    with backend.numba_launch():
        _scores(
            s.numpy(),
            u.numpy(),
            t.numpy(),
            log_tail is not None,
            need_grad,
            loss.numpy(),
            d_r.numpy(),
            d_u.numpy(),
            d_t.numpy(),
        )
    if not need_grad:
        return loss, s.new_empty(0), s.new_empty(0), s.new_empty(0)
    return loss, d_r, d_u if unranked is not None else s.new_empty(0), d_t


def _ids(ranked_idx, unranked_idx, rows):
    """The id tensors as contiguous int64; an absent unranked_idx as [n, 0], absent rows as [0]."""
    r = ranked_idx.to(torch.int64).contiguous()
    u = torch.empty((r.shape[0], 0), dtype=torch.int64) if unranked_idx is None else unranked_idx
    rows = torch.empty(0, dtype=torch.int64) if rows is None else rows
    return r, u.to(torch.int64).contiguous(), rows.to(torch.int64).contiguous()


def emb_forward(query, item, ranked_idx, unranked_idx, log_tail, rows, need_grad):
    """(loss [B], d_ranked [B, K], d_unranked [B, L], d_tail [B], grad_query [B, d]).

    One pass per row: gather the scores, evaluate the loss and (need_grad) the row's gradients at
    unit upstream gradient (empty tensors stand for what is absent or not needed). ValueError naming
    the argument for an id outside [-1, N) (rows: outside [0, query rows)), checked before the
    kernel runs.
    """
    check_ids(ranked_idx, unranked_idx, rows, item.shape[0], query.shape[0])
    q, e = query.detach().contiguous(), item.detach().contiguous()
    n_rows, d = q.shape
    B = n_rows if rows is None else rows.shape[0]
    r, u, rw = _ids(ranked_idx, unranked_idx, rows)
    K, L = r.shape[1], u.shape[1]
    dt = q.dtype
    t = _or_empty(log_tail, (0,), dt)
    loss = torch.empty(B, dtype=dt)
    d_r = torch.empty((B, K) if need_grad else (B, 0), dtype=dt)
    d_u = torch.empty((B, L) if need_grad else (B, 0), dtype=dt)
    d_t = torch.empty(B if need_grad and log_tail is not None else 0, dtype=dt)
    gq = torch.empty((B, d) if need_grad else (0, d), dtype=dt)
    with backend.numba_launch():
        _emb_forward(
            q.numpy(),
            e.numpy(),
            rw.numpy(),
            rows is not None,
            r.numpy(),
            u.numpy(),
            t.numpy(),
            log_tail is not None,
            need_grad,
            loss.numpy(),
            d_r.numpy(),
            d_u.numpy(),
            d_t.numpy(),
            gq.numpy(),
        )
    if not need_grad:
        return (loss, *(q.new_empty(0) for _ in range(4)))  # four tensors: outputs never alias
    return loss, d_r, d_u if unranked_idx is not None else q.new_empty(0), d_t, gq


def emb_backward(
    grad, query, item, ranked_idx, unranked_idx, rows, d_ranked, d_unranked, grad_query
):
    """(grad_query [n_rows, d], grad_item [N, d]): the saved row gradients times grad, scattered.
    Deterministic for any thread count (each item row sums its entries in (row, position)
    order)."""
    q = query.detach().contiguous()
    n_rows, d = q.shape
    N = item.shape[0]
    g = grad.detach().to(q.dtype).contiguous()
    B = g.shape[0]
    r, u, rw = _ids(ranked_idx, unranked_idx, rows)
    d_u = _or_empty(None if unranked_idx is None else d_unranked, (B, 0), q.dtype)
    grad_q = torch.zeros_like(q)
    grad_e = torch.zeros((N, d), dtype=q.dtype)
    with backend.numba_launch():
        _emb_backward(
            g.numpy(),
            q.numpy(),
            rw.numpy(),
            rows is not None,
            r.numpy(),
            u.numpy(),
            _np(d_ranked),
            d_u.numpy(),
            _np(grad_query),
            grad_q.numpy(),
            grad_e.numpy(),
        )
    return grad_q, grad_e
