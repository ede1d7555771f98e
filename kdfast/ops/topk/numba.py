"""numba backend of kdfast.topk_scores: the algorithm of the cpp kernel (csrc/topk.cpp) compiled
by numba, for where the C++ extension cannot be built.

Math: for every query row r and key j not excluded for r, s_rj = <q_r, k_j>, accumulated in the
input precision (float32, or float64 for float64 inputs) over p = 0..d-1 in that order, then rounded
to float32 and ranked by the int64 rank key of kdfast._core.numerics (descending score, ties to the
lower key index, -0 == +0, a score that is not finite ranks and is reported as -inf; empty slots:
index -1, value -inf).

Memory plan (no n_q x n_k score matrix):
  * keys are packed once into panels of NR keys, transposed: packed[panel, d, NR] (zero-padded);
  * each parallel iteration takes a block of queries (copied, zero-padded to a multiple of MR rows)
    and walks the key panels in chunks of about 256 KB (kept in L2); for each group of MR query rows
    and each panel an MR x NR score tile is accumulated (inner loop over the NR keys of a panel row,
    which LLVM vectorises; one key load serves MR rows);
  * every row keeps a threshold (its k-th best rank key so far and that key's float score): a tile
    row with no score above it is dropped at once; a score that passes is rank-encoded and, unless
    excluded, appended to the row's candidate buffer (2 min(k, n_k) keys); a full buffer is cut
    back to its best min(k, n_k) (quickselect), which raises the threshold. Keys reach a row in
    increasing index order, so a score equal to the threshold's loses the tie: "s <= threshold"
    rejects exactly;
  * exclusions: the row's sorted ids, walked by a pointer that moves only for candidates that pass.
Per block: its queries, 2 min(k, n_k) int64 candidates per row and one tile. Every output row is
written by one iteration and sums in a fixed order: the same bits for any thread count.
Compiled on first use for each dtype and cached on disk (numba cache=True).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ..._core import backend
from ..._core.csr import canonicalize, rows_sorted

MR = 4  # query rows per tile
NR = 64  # keys per panel
CHUNK_BYTES = 256 * 1024  # key panels walked together by a block (L2)
CAND_BYTES = 64 << 20  # candidate buffers of one block, at most (unless k alone needs more)
EMPTY = np.int64(-(2**63))
LOW = np.int64(0xFFFFFFFF)
SIGN = np.int64(0x7FFFFFFF)


@njit(cache=True, nogil=True)
def _rank_key(s, j, fbuf, ibuf):
    """The rank key of float32 score s at key index j (fbuf, ibuf: one float32 and its int32
    view)."""
    if not np.isfinite(s):
        s = np.float32(-np.inf)
    if s == 0:
        s = np.float32(0.0)
    fbuf[0] = s
    b = np.int64(ibuf[0])
    ordered = b if b >= 0 else b ^ SIGN
    return ordered * (LOW + 1) + (LOW - j)


@njit(cache=True, nogil=True)
def _key_value(key, fbuf, ibuf):
    ordered = (key - (key & LOW)) >> 32
    b = ordered if ordered >= 0 else ordered ^ SIGN
    ibuf[0] = np.int32(b)
    return fbuf[0]


@njit(cache=True, nogil=True)
def _keep_largest(buf, n, keep):
    """Reorders the distinct keys buf[:n] so that buf[:keep] holds the keep largest, the smallest of
    them at buf[keep - 1] (quickselect, median-of-three pivots: expected O(n)); returns that key."""
    lo, hi = 0, n - 1
    target = keep - 1
    while lo < hi:
        a, b, c = buf[lo], buf[(lo + hi) >> 1], buf[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:
            while buf[i] > pivot:
                i += 1
            while buf[j] < pivot:
                j -= 1
            if i <= j:
                buf[i], buf[j] = buf[j], buf[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break  # buf[j + 1 .. i - 1] hold the pivot: the target among them
    return buf[target]


@njit(cache=True, nogil=True, fastmath={"contract"})
def _block(queries, packed, n_k, q0, rows, k, keep, cap, chunk, indptr, indices, out_v, out_i):
    """Top-k of queries [q0, q0 + rows) against every key, into out_v / out_i."""
    d = queries.shape[1]
    n_panels = packed.shape[0]
    rows_pad = (rows + MR - 1) // MR * MR
    qb = np.zeros((rows_pad, d), queries.dtype)
    qb[:rows] = queries[q0 : q0 + rows]
    cand = np.empty((rows_pad, cap), np.int64)
    count = np.zeros(rows_pad, np.int64)
    thr_key = np.full(rows_pad, EMPTY, np.int64)
    thr_f = np.full(rows_pad, np.float32(np.inf), np.float32)  # padding rows take nothing
    thr_f[:rows] = np.float32(np.nan)  # a NaN threshold lets every score through
    ex = np.empty(rows_pad, np.int64)
    ex_end = np.empty(rows_pad, np.int64)
    for r in range(rows):
        ex[r] = indptr[q0 + r]
        ex_end[r] = indptr[q0 + r + 1]
    tile = np.empty((MR, NR), queries.dtype)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for c0 in range(0, n_panels, chunk):
        c1 = min(n_panels, c0 + chunk)
        for g in range(0, rows_pad, MR):
            for pn in range(c0, c1):
                t0, t1, t2, t3 = tile[0], tile[1], tile[2], tile[3]
                for l in range(NR):
                    t0[l] = 0
                    t1[l] = 0
                    t2[l] = 0
                    t3[l] = 0
                for p in range(d):
                    a0, a1, a2, a3 = qb[g, p], qb[g + 1, p], qb[g + 2, p], qb[g + 3, p]
                    kp = packed[pn, p]
                    for l in range(NR):
                        kv = kp[l]
                        t0[l] += a0 * kv
                        t1[l] += a1 * kv
                        t2[l] += a2 * kv
                        t3[l] += a3 * kv
                jbase = pn * NR
                lanes = min(NR, n_k - jbase)
                for i in range(MR):
                    r = g + i
                    if r >= rows:
                        break
                    ti = tile[i]
                    thr = thr_f[r]
                    n_pass = 0
                    for l in range(NR):
                        n_pass += not (np.float32(ti[l]) <= thr)
                    if n_pass == 0:
                        continue
                    for l in range(lanes):
                        s = np.float32(ti[l])
                        if s <= thr_f[r]:
                            continue
                        j = jbase + l
                        key = _rank_key(s, j, fbuf, ibuf)
                        if key <= thr_key[r]:
                            continue
                        e = ex[r]
                        while e < ex_end[r] and indices[e] < j:
                            e += 1
                        ex[r] = e
                        if e < ex_end[r] and indices[e] == j:
                            continue
                        cand[r, count[r]] = key
                        count[r] += 1
                        if count[r] == cap:
                            thr_key[r] = _keep_largest(cand[r], cap, keep)
                            count[r] = keep
                            thr_f[r] = _key_value(thr_key[r], fbuf, ibuf)
    for r in range(rows):
        c = count[r]
        buf = cand[r, :c]
        buf.sort()
        n = min(c, k)
        for t in range(n):
            key = buf[c - 1 - t]
            out_v[q0 + r, t] = _key_value(key, fbuf, ibuf)
            out_i[q0 + r, t] = LOW - (key & LOW)
        for t in range(n, k):
            out_v[q0 + r, t] = -np.inf
            out_i[q0 + r, t] = -1


@njit(parallel=True, cache=True, nogil=True)
def _topk(queries, keys, k, indptr, indices, out_v, out_i, qb):
    n_q, d = queries.shape
    n_k = keys.shape[0]
    n_panels = (n_k + NR - 1) // NR
    packed = np.zeros((n_panels, d, NR), queries.dtype)
    for pn in prange(n_panels):
        for l in range(min(NR, n_k - pn * NR)):
            for p in range(d):
                packed[pn, p, l] = keys[pn * NR + l, p]
    keep = max(1, min(k, n_k))
    cap = 2 * keep
    chunk = max(1, CHUNK_BYTES // (queries.itemsize * max(d, 1) * NR))
    n_blocks = (n_q + qb - 1) // qb
    for b in prange(n_blocks):
        q0 = b * qb
        _block(queries, packed, n_k, q0, min(qb, n_q - q0), k, keep, cap, chunk, indptr, indices,
               out_v, out_i)  # fmt: skip


def _block_rows(n_q, n_k, k, threads):
    """Query rows per parallel block: up to 16 tiles, fewer so that every thread gets work and the
    candidate buffers stay under CAND_BYTES."""
    per_thread = -(-n_q // threads)
    qb = min(16 * MR, -(-per_thread // MR) * MR)
    by_mem = CAND_BYTES // (16 * max(1, min(k, n_k))) // MR * MR
    return max(MR, min(qb, by_mem))


def topk_scores(queries, keys, k, excl_indptr, excl_indices):
    """Top-k keys per query on the CPU (numba); the contract of kdfast.ops.topk.

    queries [n_q, d], keys [n_k, d]: contiguous float32 or float64 CPU tensors (float64: dot
    products in double, rounded to float32 for ranking). The exclusion rows are sorted here when
    they are not. Bitwise deterministic, whatever the number of threads.
    """
    n_q = queries.shape[0]
    n_k = keys.shape[0]
    indptr, indices = excl_indptr.contiguous(), excl_indices.contiguous()
    if not rows_sorted(indptr, indices):
        indptr, indices = canonicalize(indptr, indices, n_k)
    values = torch.empty((n_q, k), dtype=torch.float32)
    index = torch.empty((n_q, k), dtype=torch.int64)
    qb = _block_rows(n_q, n_k, k, backend.num_threads())
    with backend.numba_launch():
        _topk(
            queries.detach().numpy(),
            keys.detach().numpy(),
            k,
            indptr.numpy(),
            indices.numpy(),
            values.numpy(),
            index.numpy(),
            qb,
        )
    return values, index
