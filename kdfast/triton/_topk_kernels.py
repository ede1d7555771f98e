"""Triton kernels of kdfast.triton.topk (imported lazily by it, so that TRITON_INTERPRET applies).

Rank keys as in kdfast.reference.topk: key = ordered(score) * 2^32 + (2^32 - 1 - index), EMPTY = -2^63;
2^62 marks "no further excluded id" (beyond every tile).
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
    # rank keys of cleaned scores s [BM, BN] (no NaN) at key indices cols [BN]
    b = s.to(tl.int32, bitcast=True)
    b = tl.where(s == 0.0, 0, b)  # -0 -> +0
    o = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    low = tl.full([BN], 2**32 - 1, tl.int64) - cols.to(tl.int64)
    return (o.to(tl.int64) << 32) + low[None, :]


@triton.jit
def _excluded(excl_ptr, ep, ee, nxt, cols, tile_end, BM: tl.constexpr, BN: tl.constexpr,
              E: tl.constexpr):
    # Knock-out mask of the tile [tile_end - BN, tile_end): walk each row's sorted exclusion list from
    # its pointer ep (ids below the tile were consumed by earlier tiles), E ids at a time.
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


@triton.jit
def _compact(buf_row, count, row_ok, K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr):
    # Candidate lists [BM, C] (first count[r] valid) -> their top KP keys (sorted, stored back in
    # slots [0, KP)), and the new thresholds: the score of each row's k-th key.
    tl.debug_barrier()  # appends by other threads of this program are visible
    j = tl.arange(0, C)
    x = tl.load(buf_row[:, None] + j[None, :], mask=j[None, :] < count[:, None], other=-(2**63))
    top = tl.topk(x, KP)
    jj = tl.arange(0, KP)
    tl.debug_barrier()  # every thread has read the lists before they are overwritten
    tl.store(buf_row[:, None] + jj[None, :], top, mask=row_ok[:, None])
    kth = tl.max(tl.where(jj[None, :] == K - 1, top, -(2**63)), axis=1)
    thr = tl.where(row_ok, _score_key(kth), float("inf"))
    return top, thr


@triton.jit
def _load_q(q_ptr, rows64, row_ok, dd, d, stride_q):
    return tl.load(q_ptr + rows64[:, None] * stride_q + dd[None, :],
                   mask=row_ok[:, None] & (dd[None, :] < d), other=0.0)


@triton.jit
def _scores(q, k_ptr, cols, col_ok, dd, d, stride_k, PREC: tl.constexpr):
    # score tile [BM, BN] = q @ k[cols]^T in float32, NaN -> -inf
    kt = tl.load(k_ptr + cols[None, :].to(tl.int64) * stride_k + dd[:, None],
                 mask=col_ok[None, :] & (dd[:, None] < d), other=0.0)
    s = tl.dot(q, kt, input_precision=PREC)
    return tl.where(s == s, s, float("-inf"))


@triton.jit
def _buffer_step(q, k_ptr, excl_ptr, buf_row, row_ok, n0, hi, d, stride_k, count, thr, ep, ee, nxt,
                 K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BD: tl.constexpr, E: tl.constexpr, PREC: tl.constexpr, HAS_EXCL: tl.constexpr):
    # One key tile [n0, n0 + BN) of _buffer_kernel: append the keys reaching each row's threshold.
    cols = n0 + tl.arange(0, BN)
    col_ok = cols < hi
    s = _scores(q, k_ptr, cols, col_ok, tl.arange(0, BD), d, stride_k, PREC)
    cand = (s >= thr[:, None]) & col_ok[None, :]
    if HAS_EXCL:
        if tl.min(nxt) < n0 + BN:
            kill, ep, nxt = _excluded(excl_ptr, ep, ee, nxt, cols, n0 + BN, BM, BN, E)
            cand = cand & ~kill
    if tl.max(cand.to(tl.int32)) > 0:
        n_new = tl.sum(cand.to(tl.int32), axis=1)
        if tl.max(count + n_new) > C:
            top, thr = _compact(buf_row, count, row_ok, K, KP, C)
            count = tl.full([BM], KP, dtype=tl.int32)
            cand = cand & (s >= thr[:, None])
            tl.debug_barrier()
        key = _encode(s, cols, BN)
        ci = cand.to(tl.int32)
        pos = count[:, None] + tl.cumsum(ci, axis=1) - 1
        tl.store(buf_row[:, None] + pos, key, mask=cand)
        count += tl.sum(ci, axis=1)
    return count, thr, ep, nxt


@triton.jit
def _buffer_kernel(q_ptr, k_ptr, excl_ptr, excl_start_ptr, excl_end_ptr, buf_ptr, part_ptr,
                   n_q, n_k, d, chunk, stride_q, stride_k,
                   K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BD: tl.constexpr, E: tl.constexpr, PREC: tl.constexpr,
                   HAS_EXCL: tl.constexpr, WHILE_LOOP: tl.constexpr):
    # Math: for the rows r of this block and the keys j of this program's range [lo, hi),
    #   s[r, j] = <q_r, k_j> (float32 accumulation), NaN -> -inf;
    #   part[split, r, :KP] = the KP largest rank keys over j not excluded for r, sorted descending.
    # Memory plan: q block [BM, BD] in registers for the whole scan; per tile one key tile [BD, BN]
    # read and the score tile [BM, BN] in registers; per row a threshold (float32: the score of its
    # current k-th key) and the fill count of its candidate list buf[split, r, :C] (int64, global,
    # L2-resident). Keys whose score reaches the threshold are appended (positions from a row-wise
    # cumsum); lists about to overflow are compacted on chip (tl.topk over [BM, C] -> KP kept), which
    # raises the thresholds. Writes: the lists, then part[split, rows, :KP].
    # Exclusions: per row a pointer into its sorted excluded ids; a tile looks at them only when some
    # row's next excluded id falls inside it. WHILE_LOOP: the interpreter's form of the tile loop.
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
    buf_row = buf_ptr + (pid_s * n_q + rows64) * C
    ep = tl.zeros([BM], dtype=tl.int64)
    ee = ep
    nxt = ep + 2**62
    if HAS_EXCL:
        ep = tl.load(excl_start_ptr + pid_s * n_q + rows64, mask=row_ok, other=0)
        ee = tl.load(excl_end_ptr + rows64, mask=row_ok, other=0)
        nxt = tl.load(excl_ptr + ep, mask=ep < ee, other=2**62)
    count = tl.zeros([BM], dtype=tl.int32)
    thr = tl.where(row_ok, float("-inf"), float("inf"))
    if WHILE_LOOP:
        n0 = lo
        while n0 < hi:
            count, thr, ep, nxt = _buffer_step(q, k_ptr, excl_ptr, buf_row, row_ok, n0, hi, d, stride_k,
                                               count, thr, ep, ee, nxt, K, KP, C, BM, BN, BD, E, PREC,
                                               HAS_EXCL)
            n0 += BN
    else:
        for n0 in range(lo, hi, BN):
            count, thr, ep, nxt = _buffer_step(q, k_ptr, excl_ptr, buf_row, row_ok, n0, hi, d, stride_k,
                                               count, thr, ep, ee, nxt, K, KP, C, BM, BN, BD, E, PREC,
                                               HAS_EXCL)
    top, thr = _compact(buf_row, count, row_ok, K, KP, C)
    jj = tl.arange(0, KP)
    tl.store(part_ptr + (pid_s * n_q + rows64)[:, None] * KP + jj[None, :], top, mask=row_ok[:, None])


@triton.jit
def _merge_step(q, k_ptr, excl_ptr, row_ok, n0, hi, d, stride_k, best, kth, ep, ee, nxt,
                K: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                E: tl.constexpr, PREC: tl.constexpr, HAS_EXCL: tl.constexpr):
    # One key tile [n0, n0 + BN) of _merge_kernel (BN == KP).
    cols = n0 + tl.arange(0, BN)
    col_ok = cols < hi
    s = _scores(q, k_ptr, cols, col_ok, tl.arange(0, BD), d, stride_k, PREC)
    ok = col_ok[None, :] & row_ok[:, None]
    if HAS_EXCL:
        if tl.min(nxt) < n0 + BN:
            kill, ep, nxt = _excluded(excl_ptr, ep, ee, nxt, cols, n0 + BN, BM, BN, E)
            ok = ok & ~kill
    key = tl.where(ok, _encode(s, cols, BN), -(2**63))
    if tl.max((key > kth[:, None]).to(tl.int32)) > 0:
        both = tl.reshape(tl.join(best, key), [BM, 2 * KP])
        best = tl.topk(both, KP)
        jj = tl.arange(0, KP)
        kth = tl.max(tl.where(jj[None, :] == K - 1, best, -(2**63)), axis=1)
    return best, kth, ep, nxt


@triton.jit
def _merge_kernel(q_ptr, k_ptr, excl_ptr, excl_start_ptr, excl_end_ptr, buf_ptr, part_ptr,
                  n_q, n_k, d, chunk, stride_q, stride_k,
                  K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BD: tl.constexpr, E: tl.constexpr, PREC: tl.constexpr,
                  HAS_EXCL: tl.constexpr, WHILE_LOOP: tl.constexpr):
    # Math: as _buffer_kernel (BN == KP here; buf_ptr and C are unused).
    # Memory plan: q block [BM, BD] and the running top-KP rank keys best [BM, KP] (int64, sorted
    # descending) in registers; per tile one key tile read and its rank keys [BM, BN] built in
    # registers (excluded / out-of-range keys = EMPTY); when some key beats its row's k-th key the tile
    # is merged: best = topk(join(best, tile keys), KP). Writes part[split, rows, :KP] once.
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
    ep = tl.zeros([BM], dtype=tl.int64)
    ee = ep
    nxt = ep + 2**62
    if HAS_EXCL:
        ep = tl.load(excl_start_ptr + pid_s * n_q + rows64, mask=row_ok, other=0)
        ee = tl.load(excl_end_ptr + rows64, mask=row_ok, other=0)
        nxt = tl.load(excl_ptr + ep, mask=ep < ee, other=2**62)
    best = tl.full([BM, KP], -(2**63), dtype=tl.int64)
    kth = tl.full([BM], -(2**63), dtype=tl.int64)
    if WHILE_LOOP:
        n0 = lo
        while n0 < hi:
            best, kth, ep, nxt = _merge_step(q, k_ptr, excl_ptr, row_ok, n0, hi, d, stride_k, best, kth,
                                             ep, ee, nxt, K, KP, BM, BN, BD, E, PREC, HAS_EXCL)
            n0 += BN
    else:
        for n0 in range(lo, hi, BN):
            best, kth, ep, nxt = _merge_step(q, k_ptr, excl_ptr, row_ok, n0, hi, d, stride_k, best, kth,
                                             ep, ee, nxt, K, KP, BM, BN, BD, E, PREC, HAS_EXCL)
    jj = tl.arange(0, KP)
    tl.store(part_ptr + (pid_s * n_q + rows64)[:, None] * KP + jj[None, :], best, mask=row_ok[:, None])


KERNELS = {"buffer": _buffer_kernel, "merge": _merge_kernel}
