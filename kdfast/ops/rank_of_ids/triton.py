"""Triton backend of kdfast.rank_of_ids: a program takes a block of BM queries and MT of their
given ids and sweeps the keys twice in tiles of BN, scoring each tile with tl.dot:

  pass 1: each given id's score is taken out of the score tile that holds its key (tiles holding
          none of the block's ids are skipped): bitwise the number its key is compared with;
  pass 2: per tile, count[r, t] += #{j in tile not excluded for r : s_rj > s_t, or s_rj == s_t
          and j < id_t}, a [BM, MT, BN] comparison (tiles whose best score is below every given
          score of the block are skipped).

Scores that are not finite count as -inf, -0 == +0 (kdfast.ops.topk's _scores); exclusions are
walked per row along its sorted ids (kdfast.ops.topk's _excluded). Nothing grows with n_k; no
atomics, the same inputs give bitwise the same ranks. Precision as kdfast.ops.topk.triton: float32
inputs use IEEE products unless torch.backends.cuda.matmul.allow_tf32 (then TF32),
float16/bfloat16 the tensor cores with float32 accumulation, float64 inputs are rounded to float32
first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._core import backend
from ..._core.csr import canonicalize
from ..topk.triton_kernels import _excluded, _load_q, _scores

# sm_90 compile (bench/compile_triton.py): 8 warps keep this tiling within the registers (4 warps
# spill 16-40 B of 255 registers)
CONFIG = {"block_m": 32, "block_n": 32, "block_t": 16, "num_warps": 8}
LAST_LAUNCH = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@triton.jit
def _given_scores(
    q, k_ptr, tid, n0, n_k, d, stride_k, thr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr
):
    # pass 1, one key tile [n0, n0 + BN): the scores of the given ids it holds
    if tl.sum(((tid >= n0) & (tid < n0 + BN)).to(tl.int32)) > 0:
        cols = n0 + tl.arange(0, BN)
        s = _scores(q, k_ptr, cols, cols < n_k, tl.arange(0, BD), d, stride_k, PREC)
        hit = tid[:, :, None] == cols.to(tl.int64)[None, None, :]
        thr = tl.maximum(thr, tl.max(tl.where(hit, s[:, None, :], float("-inf")), axis=2))
    return thr


@triton.jit
def _count_step(
    q,
    k_ptr,
    excl_ptr,
    tid,
    thr,
    thr_min,
    cnt,
    n0,
    n_k,
    d,
    stride_k,
    ep,
    ee,
    nxt,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    E: tl.constexpr,
    PREC: tl.constexpr,
):
    # pass 2, one key tile [n0, n0 + BN): the keys above each given key, excluded keys left out
    cols = n0 + tl.arange(0, BN)
    col_ok = cols < n_k
    s = _scores(q, k_ptr, cols, col_ok, tl.arange(0, BD), d, stride_k, PREC)
    ok = tl.zeros([BM, BN], dtype=tl.int1) | col_ok[None, :]
    if tl.min(nxt) < n0 + BN:
        kill, ep, nxt = _excluded(excl_ptr, ep, ee, nxt, cols, n0 + BN, BM, BN, E)
        ok = ok & ~kill
    if tl.max(tl.where(ok, s, float("-inf"))) >= thr_min:
        s3 = s[:, None, :]
        t3 = thr[:, :, None]
        above = (s3 > t3) | ((s3 == t3) & (cols.to(tl.int64)[None, None, :] < tid[:, :, None]))
        cnt += tl.sum((above & ok[:, None, :]).to(tl.int32), axis=2)
    return cnt, ep, nxt


@triton.jit
def _rank_kernel(
    q_ptr,
    k_ptr,
    ids_ptr,
    excl_ptr,
    excl_start_ptr,
    excl_end_ptr,
    out_ptr,
    n_q,
    n_k,
    d,
    m,
    stride_q,
    stride_k,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    MT: tl.constexpr,
    E: tl.constexpr,
    PREC: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    # Math: for the rows r of this block and the given ids id[r, t] of this program's MT columns,
    #   out[r, t] = #{j not excluded for r : key(s_rj, j) > key(s_r,id, id)} (-1 for id -1), with
    #   s = <q_r, k_j> in float32 (not finite -> -inf) and key the topk rank key (descending score,
    #   ties to the lower index).
    # Memory plan: the q block [BM, BD], the given ids [BM, MT] (int64), their scores thr [BM, MT]
    # and counts [BM, MT] in registers; per tile a key tile [BD, BN] read, its scores [BM, BN] and
    # the comparison [BM, MT, BN] on chip. Writes out[rows, columns] once. WHILE_LOOP: the
    # interpreter's form of the tile loops.
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < n_q
    rows64 = rows.to(tl.int64)
    tt = pid_t * MT + tl.arange(0, MT)
    tmask = row_ok[:, None] & (tt[None, :] < m)
    tid = tl.load(ids_ptr + rows64[:, None] * m + tt[None, :], mask=tmask, other=-1)
    q = _load_q(q_ptr, rows64, row_ok, tl.arange(0, BD), d, stride_q)
    thr = tl.full([BM, MT], float("-inf"), dtype=tl.float32)
    if WHILE_LOOP:
        n0 = 0
        while n0 < n_k:
            thr = _given_scores(q, k_ptr, tid, n0, n_k, d, stride_k, thr, BN, BD, PREC)
            n0 += BN
    else:
        for n0 in range(0, n_k, BN):
            thr = _given_scores(q, k_ptr, tid, n0, n_k, d, stride_k, thr, BN, BD, PREC)
    thr_min = tl.min(tl.where(tid >= 0, thr, float("inf")))
    ep = tl.load(excl_start_ptr + rows64, mask=row_ok, other=0)
    ee = tl.load(excl_end_ptr + rows64, mask=row_ok, other=0)
    nxt = tl.load(excl_ptr + ep, mask=ep < ee, other=2**62)
    cnt = tl.zeros([BM, MT], dtype=tl.int32)
    if WHILE_LOOP:
        n0 = 0
        while n0 < n_k:
            cnt, ep, nxt = _count_step(
                q,
                k_ptr,
                excl_ptr,
                tid,
                thr,
                thr_min,
                cnt,
                n0,
                n_k,
                d,
                stride_k,
                ep,
                ee,
                nxt,
                BM,
                BN,
                BD,
                E,
                PREC,
            )
            n0 += BN
    else:
        for n0 in range(0, n_k, BN):
            cnt, ep, nxt = _count_step(
                q,
                k_ptr,
                excl_ptr,
                tid,
                thr,
                thr_min,
                cnt,
                n0,
                n_k,
                d,
                stride_k,
                ep,
                ee,
                nxt,
                BM,
                BN,
                BD,
                E,
                PREC,
            )
    out = tl.where(tid >= 0, cnt.to(tl.int64), -1)
    tl.store(out_ptr + rows64[:, None] * m + tt[None, :], out, mask=tmask)


def rank_of_ids(
    queries,
    keys,
    ids,
    excl_indptr,
    excl_indices,
    max_rank=-1,
    *,
    block_m=None,
    block_n=None,
    block_t=None,
    num_warps=None,
    excl_chunk=4,
):
    """Ranks [n_q, m] int64 of the given key ids per query (one Triton kernel, two key sweeps);
    the contract of kdfast.ops.rank_of_ids.

    queries [n_q, d], keys [n_k, d]: float32/float16/bfloat16 (float64 is rounded to float32), on
    one device; ids int64 [n_q, m] in [-1, n_k); excl_indptr/excl_indices: validated int64 CSR
    (canonicalised here); max_rank >= 0: ranks clamped to it. block_m / block_n / block_t (powers of
    two, >= 16 for the first two): queries, keys and given ids per program and tile (default
    CONFIG); num_warps: CONFIG's unless given.
    Memory: the output and the canonical exclusion CSR; nothing grows with n_k.
    """
    n_q, d = queries.shape
    n_k, m = keys.shape[0], ids.shape[1]
    dev = queries.device
    if n_k >= 2**31 - 1024:
        raise ValueError(
            f"keys must have fewer than 2^31 - 1024 rows for the triton backend, got {n_k}"
        )
    if queries.dtype == torch.float64:
        queries, keys = queries.float(), keys.float()
    queries, keys, ids = queries.contiguous(), keys.contiguous(), ids.contiguous()
    bm = block_m or CONFIG["block_m"]
    bn = block_n or CONFIG["block_n"]
    mt = block_t or min(CONFIG["block_t"], max(1, _next_pow2(m)))
    bd = max(16, _next_pow2(d))
    if excl_indices.numel() > 0:
        indptr, eids = canonicalize(excl_indptr, excl_indices, n_k)
        starts = indptr[:-1].contiguous()
        ends = indptr[1:].clone()  # a fresh, aligned buffer
    else:  # every row's list is empty: the kernel never looks at an excluded id
        eids = torch.zeros(1, dtype=torch.int64, device=dev)
        starts = torch.zeros(n_q, dtype=torch.int64, device=dev)
        ends = torch.zeros(n_q, dtype=torch.int64, device=dev)
    out = torch.empty((n_q, m), dtype=torch.int64, device=dev)
    if queries.dtype == torch.float32:
        prec = "tf32" if (dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        prec = "ieee"
    grid = (triton.cdiv(n_q, bm), triton.cdiv(m, mt))
    LAST_LAUNCH["kernel"] = _rank_kernel[grid](
        queries,
        keys,
        ids,
        eids,
        starts,
        ends,
        out,
        n_q,
        n_k,
        d,
        m,
        queries.stride(0),
        keys.stride(0),
        BM=bm,
        BN=bn,
        BD=bd,
        MT=mt,
        E=excl_chunk,
        PREC=prec,
        WHILE_LOOP=backend.interpreting(),
        num_warps=num_warps or CONFIG["num_warps"],
    )
    return out.clamp_max_(max_rank) if max_rank >= 0 else out
