"""Triton kernels of kdfast.ops.topk.triton (imported on first use, so that TRITON_INTERPRET
applies).

Rank keys as in kdfast._core.numerics: key = ordered(score) * 2^32 + (2^32 - 1 - index),
EMPTY = -2^63; 2^62 marks "no further excluded id" (beyond every tile).
"""

import triton
import triton.language as tl


@triton.jit
def _score_key(key):
    # float32 score of a rank key; EMPTY -> -inf
    o = (key >> 32).to(tl.int32)
    b = tl.where(o >= 0, o, o ^ 0x7FFFFFFF)
    f = b.to(tl.float32, bitcast=True)
    return tl.where(key == -(2**63), float("-inf"), f)


@triton.jit
def _encode(s, cols, BN: tl.constexpr):
    # rank keys of cleaned scores s [BM, BN] (finite or -inf) at key indices cols [BN]
    b = s.to(tl.int32, bitcast=True)
    b = tl.where(s == 0.0, 0, b)  # -0 -> +0
    o = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    low = tl.full([BN], 2**32 - 1, tl.int64) - cols.to(tl.int64)
    return (o.to(tl.int64) << 32) + low[None, :]


@triton.jit
def _excluded(
    excl_ptr, ep, ee, nxt, cols, tile_end, BM: tl.constexpr, BN: tl.constexpr, E: tl.constexpr
):
    # Knock-out mask of the tile [tile_end - BN, tile_end): walk each row's sorted exclusion list
    # from its pointer ep (ids below the tile were consumed by earlier tiles), E ids at a time.
    kill = tl.zeros([BM, BN], dtype=tl.int1)
    while tl.min(nxt) < tile_end:
        base = ep
        nh = tl.zeros([BM], dtype=tl.int64)
        for e in tl.static_range(E):
            pe = base + e
            ide = tl.load(excl_ptr + pe, mask=pe < ee, other=2**62)
            hit = ide < tile_end
            kill = kill | (cols[None, :] == tl.where(hit, ide, -1).to(tl.int32)[:, None])
            nh += hit.to(tl.int64)
        ep = base + nh
        nxt = tl.load(excl_ptr + ep, mask=ep < ee, other=2**62)
    return kill, ep, nxt


@triton.jit(noinline=True)
def _compact_rows(
    buf_ptr,
    aux_ptr,
    part_ptr,
    row0,
    n_q,
    k,
    FINAL: tl.constexpr,
    KP: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    R: tl.constexpr,
):
    # Rows [row0, row0 + BM), R at a time: candidate lists buf[row, :aux[row, 1]] -> their best KP
    # keys, sorted descending, into buf[row, :KP] (FINAL: part[row, :KP]); the k-th key into
    # aux[row, 0]. Not inlined, so that its [R, C] keys do not add to the register pressure of the
    # scan loop.
    j = tl.arange(0, C)
    jj = tl.arange(0, KP)
    for r0 in tl.static_range(0, BM, R):
        rr = (row0 + r0 + tl.arange(0, R)).to(tl.int64)
        rr_ok = rr < n_q
        cnt = tl.load(aux_ptr + rr * 2 + 1, mask=rr_ok, other=0)
        x = tl.load(
            buf_ptr + rr[:, None] * C + j[None, :], mask=j[None, :] < cnt[:, None], other=-(2**63)
        )
        top = tl.topk(x, KP)
        tl.debug_barrier()  # every thread has read these lists before they are overwritten
        if FINAL:
            tl.store(part_ptr + rr[:, None] * KP + jj[None, :], top, mask=rr_ok[:, None])
        else:
            tl.store(buf_ptr + rr[:, None] * C + jj[None, :], top, mask=rr_ok[:, None])
        kth = tl.max(tl.where(jj[None, :] == k - 1, top, -(2**63)), axis=1)
        tl.store(aux_ptr + rr * 2, kth, mask=rr_ok)


@triton.jit
def _compact(
    buf_ptr,
    aux_ptr,
    part_ptr,
    row0,
    n_q,
    rows64,
    row_ok,
    count,
    k,
    FINAL: tl.constexpr,
    KP: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    R: tl.constexpr,
):
    # Compact this program's candidate lists (see _compact_rows); counts in and k-th keys out travel
    # through aux[row, 0:2]. Returns the new thresholds: the score of each row's k-th key.
    tl.debug_barrier()  # appends of every thread of this program are visible
    tl.store(aux_ptr + rows64 * 2 + 1, count.to(tl.int64), mask=row_ok)
    tl.debug_barrier()
    _compact_rows(buf_ptr, aux_ptr, part_ptr, row0, n_q, k, FINAL, KP, C, BM, R)
    tl.debug_barrier()
    kth = tl.load(aux_ptr + rows64 * 2, mask=row_ok, other=-(2**63))
    return tl.where(row_ok, _score_key(kth), float("inf"))


@triton.jit
def _load_q(q_ptr, rows64, row_ok, dd, d, stride_q):
    return tl.load(
        q_ptr + rows64[:, None] * stride_q + dd[None, :],
        mask=row_ok[:, None] & (dd[None, :] < d),
        other=0.0,
    )


@triton.jit
def _scores(q, k_ptr, cols, col_ok, dd, d, stride_k, PREC: tl.constexpr):
    # score tile [BM, BN] = q @ k[cols]^T in float32; not finite (NaN, an overflow) -> -inf
    kt = tl.load(
        k_ptr + cols[None, :].to(tl.int64) * stride_k + dd[:, None],
        mask=col_ok[None, :] & (dd[:, None] < d),
        other=0.0,
    )
    s = tl.dot(q, kt, input_precision=PREC)
    return tl.where((s == s) & (tl.abs(s) < float("inf")), s, float("-inf"))


@triton.jit
def _buffer_step(
    q,
    k_ptr,
    excl_ptr,
    buf_ptr,
    aux_ptr,
    part_ptr,
    row0,
    n_q,
    rows64,
    row_ok,
    n0,
    hi,
    d,
    stride_k,
    count,
    thr,
    ep,
    ee,
    nxt,
    k,
    KP: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    R: tl.constexpr,
    E: tl.constexpr,
    PREC: tl.constexpr,
):
    # One key tile [n0, n0 + BN) of _buffer_kernel: append the keys reaching each row's threshold.
    cols = n0 + tl.arange(0, BN)
    col_ok = cols < hi
    s = _scores(q, k_ptr, cols, col_ok, tl.arange(0, BD), d, stride_k, PREC)
    cand = (s >= thr[:, None]) & col_ok[None, :]
    if tl.min(nxt) < n0 + BN:
        kill, ep, nxt = _excluded(excl_ptr, ep, ee, nxt, cols, n0 + BN, BM, BN, E)
        cand = cand & ~kill
    if tl.max(cand.to(tl.int32)) > 0:
        n_new = tl.sum(cand.to(tl.int32), axis=1)
        if tl.max(count + n_new) > C:
            thr = _compact(
                buf_ptr, aux_ptr, part_ptr, row0, n_q, rows64, row_ok, count, k, False, KP, C, BM, R
            )
            count = tl.full([BM], KP, dtype=tl.int32)
            cand = cand & (s >= thr[:, None])
        key = _encode(s, cols, BN)
        ci = cand.to(tl.int32)
        pos = count[:, None] + tl.cumsum(ci, axis=1) - 1
        tl.store(buf_ptr + rows64[:, None] * C + pos, key, mask=cand)
        count += tl.sum(ci, axis=1)
    return count, thr, ep, nxt


@triton.jit
def _buffer_kernel(
    q_ptr,
    k_ptr,
    excl_ptr,
    excl_start_ptr,
    excl_end_ptr,
    buf_ptr,
    aux_ptr,
    part_ptr,
    n_q,
    n_k,
    d,
    chunk,
    stride_q,
    stride_k,
    k,
    KP: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    R: tl.constexpr,
    E: tl.constexpr,
    PREC: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    # Math: for the rows r of this block and the keys j of this program's range [lo, hi),
    #   s[r, j] = <q_r, k_j> (float32 accumulation), not finite -> -inf;
    #   part[split, r, :KP] = the KP largest rank keys over j not excluded for r, sorted descending.
    # Memory plan: q block [BM, BD] in registers for the whole scan; per tile one key tile [BD, BN]
    # read and the score tile [BM, BN] in registers; per row a threshold (float32: the score of its
    # current k-th key) and the fill count of its candidate list buf[split, r, :C] (int64, global,
    # L2-resident). Keys whose score reaches the threshold are appended (positions from a row-wise
    # cumsum); lists about to overflow are compacted R rows at a time (tl.topk over [R, C] -> KP
    # kept), which raises the thresholds. Writes: the lists, aux[split, r, 0:2], then
    # part[split, rows, :KP].
    # Exclusions: per row a pointer into its sorted excluded ids; a tile looks at them only when
    # some row's next excluded id falls inside it. WHILE_LOOP: the interpreter's form of the tile
    # loop.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_m * BM
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < n_q
    rows64 = rows.to(tl.int64)
    q = _load_q(q_ptr, rows64, row_ok, tl.arange(0, BD), d, stride_q)
    lo = pid_s * chunk
    hi = lo + chunk
    if hi > n_k:
        hi = n_k
    split_off = pid_s.to(tl.int64) * n_q
    buf_s = buf_ptr + split_off * C
    aux_s = aux_ptr + split_off * 2
    part_s = part_ptr + split_off * KP
    ep = tl.load(excl_start_ptr + split_off + rows64, mask=row_ok, other=0)
    ee = tl.load(excl_end_ptr + rows64, mask=row_ok, other=0)
    nxt = tl.load(excl_ptr + ep, mask=ep < ee, other=2**62)
    count = tl.zeros([BM], dtype=tl.int32)
    thr = tl.where(row_ok, float("-inf"), float("inf"))
    if WHILE_LOOP:
        n0 = lo
        while n0 < hi:
            count, thr, ep, nxt = _buffer_step(
                q,
                k_ptr,
                excl_ptr,
                buf_s,
                aux_s,
                part_s,
                row0,
                n_q,
                rows64,
                row_ok,
                n0,
                hi,
                d,
                stride_k,
                count,
                thr,
                ep,
                ee,
                nxt,
                k,
                KP,
                C,
                BM,
                BN,
                BD,
                R,
                E,
                PREC,
            )
            n0 += BN
    else:
        for n0 in range(lo, hi, BN):
            count, thr, ep, nxt = _buffer_step(
                q,
                k_ptr,
                excl_ptr,
                buf_s,
                aux_s,
                part_s,
                row0,
                n_q,
                rows64,
                row_ok,
                n0,
                hi,
                d,
                stride_k,
                count,
                thr,
                ep,
                ee,
                nxt,
                k,
                KP,
                C,
                BM,
                BN,
                BD,
                R,
                E,
                PREC,
            )
    _compact(buf_s, aux_s, part_s, row0, n_q, rows64, row_ok, count, k, True, KP, C, BM, R)


@triton.jit
def _merge_step(
    q,
    k_ptr,
    excl_ptr,
    row_ok,
    n0,
    hi,
    d,
    stride_k,
    best,
    kth,
    ep,
    ee,
    nxt,
    k,
    KP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    E: tl.constexpr,
    PREC: tl.constexpr,
):
    # One key tile [n0, n0 + BN) of _merge_kernel (BN == KP).
    cols = n0 + tl.arange(0, BN)
    col_ok = cols < hi
    s = _scores(q, k_ptr, cols, col_ok, tl.arange(0, BD), d, stride_k, PREC)
    ok = col_ok[None, :] & row_ok[:, None]
    if tl.min(nxt) < n0 + BN:
        kill, ep, nxt = _excluded(excl_ptr, ep, ee, nxt, cols, n0 + BN, BM, BN, E)
        ok = ok & ~kill
    key = tl.where(ok, _encode(s, cols, BN), -(2**63))
    if tl.max((key > kth[:, None]).to(tl.int32)) > 0:
        both = tl.reshape(tl.join(best, key), [BM, 2 * KP])
        best = tl.topk(both, KP)
        jj = tl.arange(0, KP)
        kth = tl.max(tl.where(jj[None, :] == k - 1, best, -(2**63)), axis=1)
    return best, kth, ep, nxt


@triton.jit
def _merge_kernel(
    q_ptr,
    k_ptr,
    excl_ptr,
    excl_start_ptr,
    excl_end_ptr,
    buf_ptr,
    aux_ptr,
    part_ptr,
    n_q,
    n_k,
    d,
    chunk,
    stride_q,
    stride_k,
    k,
    KP: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    R: tl.constexpr,
    E: tl.constexpr,
    PREC: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    # Math: as _buffer_kernel (BN == KP here; buf_ptr, aux_ptr, C and R are unused).
    # Memory plan: q block [BM, BD] and the running top-KP rank keys best [BM, KP] (int64, sorted
    # descending) in registers; per tile one key tile read and its rank keys [BM, BN] built in
    # registers (excluded / out-of-range keys = EMPTY); when some key beats its row's k-th key the
    # tile is merged: best = topk(join(best, tile keys), KP). Writes part[split, rows, :KP] once.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < n_q
    rows64 = rows.to(tl.int64)
    q = _load_q(q_ptr, rows64, row_ok, tl.arange(0, BD), d, stride_q)
    lo = pid_s * chunk
    hi = lo + chunk
    if hi > n_k:
        hi = n_k
    ep = tl.load(excl_start_ptr + pid_s.to(tl.int64) * n_q + rows64, mask=row_ok, other=0)
    ee = tl.load(excl_end_ptr + rows64, mask=row_ok, other=0)
    nxt = tl.load(excl_ptr + ep, mask=ep < ee, other=2**62)
    best = tl.full([BM, KP], -(2**63), dtype=tl.int64)
    kth = tl.full([BM], -(2**63), dtype=tl.int64)
    if WHILE_LOOP:
        n0 = lo
        while n0 < hi:
            best, kth, ep, nxt = _merge_step(
                q,
                k_ptr,
                excl_ptr,
                row_ok,
                n0,
                hi,
                d,
                stride_k,
                best,
                kth,
                ep,
                ee,
                nxt,
                k,
                KP,
                BM,
                BN,
                BD,
                E,
                PREC,
            )
            n0 += BN
    else:
        for n0 in range(lo, hi, BN):
            best, kth, ep, nxt = _merge_step(
                q,
                k_ptr,
                excl_ptr,
                row_ok,
                n0,
                hi,
                d,
                stride_k,
                best,
                kth,
                ep,
                ee,
                nxt,
                k,
                KP,
                BM,
                BN,
                BD,
                E,
                PREC,
            )
    jj = tl.arange(0, KP)
    tl.store(
        part_ptr + (pid_s.to(tl.int64) * n_q + rows64)[:, None] * KP + jj[None, :],
        best,
        mask=row_ok[:, None],
    )


KERNELS = {"buffer": _buffer_kernel, "merge": _merge_kernel}
