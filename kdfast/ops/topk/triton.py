"""Triton backend of kdfast.topk_scores: top-K of dot-product scores with per-query exclusions.

One fused kernel scores a block of BM queries against tiles of BN keys with tl.dot and keeps each
query's running top-K on chip, so neither the n_q x n_k score matrix nor any per-query buffer that
grows with n_k is ever stored. The order is the reference's exactly (kdfast._core.numerics):
int64 rank keys
    key = ordered(score) * 2^32 + (2^32 - 1 - index)
(a score that is not finite ranks as -inf, -0 == +0, ties to the lower index, excluded/empty
slots = EMPTY = -2^63 -> index -1).

Two variants (module-level CONFIG["variant"] or the `variant` argument):
  "buffer" (default, fast): each row appends the keys of a tile whose score reaches the row's
      current k-th score to its candidate list of C = 2*max(KP, BN) int64 slots in global memory (KP
      = next power of two >= k; the lists are small and mostly hit L2); when a list would overflow,
      the lists are compacted with tl.topk to their best KP keys (R rows at a time, in a non-inlined
      function so that the scan loop keeps its registers) and the thresholds rise to the new k-th
      scores. A row appends about k * ln(n_k / k) keys over the whole scan (plus the threshold's
      lag), so most tiles cost one compare per score and a block-wide max on top of the matmul.
  "merge" (simple, robust, slower): the running top-KP keys live in registers and every tile in
      which some key beats its row's k-th key is merged with tl.topk over the joined [BM, 2*KP] keys
      (BN = KP); with many rows per block most tiles merge, so this is the fallback, not the fast
      path.
Both may split the key axis into S ranges ("split-K", to fill the GPU when n_q / BM is small): each
program keeps the top-KP of its range, and a short torch.topk over the S * KP partial keys of a row
finishes the job.

Precision: scores accumulate in float32. float32 inputs use exact IEEE products (tl.dot
input_precision="ieee") unless torch.backends.cuda.matmul.allow_tf32 is True, in which case they use
TF32 tensor cores ("tf32", ~10-bit mantissa products: near-ties may then order differently from the
reference). float16/bfloat16 inputs use the tensor cores with float32 accumulation; float64 inputs
are rounded to float32 first.
Determinism: no atomics; the same inputs give bitwise the same outputs.
"""

from __future__ import annotations

import torch
import triton

from ..._core import backend
from ..._core.csr import canonicalize, row_ids
from ..._core.numerics import EMPTY, decode_rank_keys
from .triton_kernels import KERNELS

CONFIG = {"variant": "buffer"}
VARIANTS = ("buffer", "merge")
LAST_LAUNCH = {}  # the last compiled kernel (its n_regs / n_spills, for the benchmark notes)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def plan(
    n_q: int,
    n_k: int,
    d: int,
    k: int,
    device,
    *,
    variant=None,
    block_m=None,
    block_n=None,
    splits=None,
    num_warps=None,
    num_stages=None,
    compact_rows=None,
) -> dict:
    """The launch configuration for one call (block sizes, split count, warps); see topk_scores."""
    variant = variant or CONFIG["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    k_eff = max(1, min(k, n_k))
    kp = max(16, _next_pow2(k_eff))
    bd = max(16, _next_pow2(d))
    if variant == "merge":
        bn = kp
    else:
        bn = block_n or (128 if bd <= 128 else 64)
    c = 2 * max(kp, bn)
    if block_m is None:
        # int64 keys on chip during a merge/compaction
        budget = 8192 if variant == "merge" else 16384
        block_m = max(16, min(64, budget // (2 * kp if variant == "merge" else c)))
        block_m = max(16, min(block_m, _next_pow2(n_q)))
    n_blocks = -(-n_q // block_m)
    if splits is None:
        on_gpu = torch.device(device).type == "cuda"
        sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
        splits = max(1, min(16, (2 * sms) // n_blocks, -(-n_k // (8 * bn))))
    chunk = triton.cdiv(triton.cdiv(n_k, splits), bn) * bn  # keys per split, a multiple of BN
    splits = max(1, triton.cdiv(n_k, chunk))
    if num_warps is None:
        num_warps = 8 if block_m * max(bn, c if variant == "buffer" else 2 * kp) >= 8192 else 4
    rows_per_compaction = compact_rows or max(1, min(block_m, 2048 // c))  # [R, C] keys on chip
    return {
        "variant": variant,
        "k_eff": k_eff,
        "KP": kp,
        "BD": bd,
        "BN": bn,
        "C": c,
        "BM": block_m,
        "R": rows_per_compaction,
        "splits": splits,
        "chunk": chunk,
        "num_warps": num_warps,
        "num_stages": num_stages or 2,
    }


def topk_scores(
    queries,
    keys,
    k,
    excl_indptr,
    excl_indices,
    *,
    variant=None,
    block_m=None,
    block_n=None,
    splits=None,
    num_warps=None,
    num_stages=None,
    compact_rows=None,
    excl_chunk=4,
):
    """Top-k keys per query by dot product, skipping excluded keys (one fused Triton kernel).

    Args:
        queries: [n_q, d] float32/float16/bfloat16 (float64 is rounded to float32), contiguous.
        keys: [n_k, d], same dtype and device.
        k: >= 1, may exceed n_k.
        excl_indptr [n_q+1], excl_indices [nnz]: int64 CSR of each query's excluded key ids
            (validated by the op; canonicalised here: sorted unique ids per row).
        variant: "buffer" (fast) or "merge" (simple); default CONFIG["variant"].
        block_m, block_n, splits, num_warps, num_stages, compact_rows: launch overrides (tests use
            tiny blocks); compact_rows (a power of two <= block_m) rows are compacted at a time.
        excl_chunk: excluded ids examined per row and step inside a tile.

    Returns values [n_q, k] float32 (descending) and indices [n_q, k] int64 with the reference
    order: descending float32 score <q, k_j>, ties to the lower j, not finite as -inf, -1 / -inf
    in empty slots.
    Memory: the output, splits * n_q * KP int64 partial keys (KP = next power of two >= k, >= 16),
    for "buffer" splits * n_q * (C + 2) int64 (candidate lists, C = 2 * max(KP, BN), and counts),
    and the canonical exclusion CSR (plus splits * n_q start pointers when splits > 1). Nothing
    grows with n_k.
    """
    n_q, d = queries.shape
    n_k = keys.shape[0]
    dev = queries.device
    if n_k >= 2**31 - 1024:
        raise ValueError(
            f"keys must have fewer than 2^31 - 1024 rows for the triton backend, got {n_k}"
        )
    if queries.dtype == torch.float64:
        queries, keys = queries.float(), keys.float()
    queries, keys = queries.contiguous(), keys.contiguous()
    cfg = plan(
        n_q,
        n_k,
        d,
        k,
        dev,
        variant=variant,
        block_m=block_m,
        block_n=block_n,
        splits=splits,
        num_warps=num_warps,
        num_stages=num_stages,
        compact_rows=compact_rows,
    )
    S, KP, C, chunk = cfg["splits"], cfg["KP"], cfg["C"], cfg["chunk"]
    if excl_indices.numel() > 0:
        indptr, ids = canonicalize(excl_indptr, excl_indices, n_k)
        starts = indptr[:-1]
        if S > 1:
            # sorted: canonical rows are sorted and rows are in order
            flat = row_ids(indptr) * n_k + ids
            lows = torch.arange(S, device=dev, dtype=torch.int64) * chunk
            want = torch.arange(n_q, device=dev, dtype=torch.int64)[None, :] * n_k + lows[:, None]
            starts = torch.searchsorted(flat, want.reshape(-1)).reshape(S, n_q)
        starts = starts.contiguous()
        ends = indptr[
            1:
        ].clone()  # a fresh, aligned buffer (Triton specialises on pointer alignment)
    else:  # every row's list is empty: the kernels never look at an excluded id
        ids = torch.zeros(1, dtype=torch.int64, device=dev)
        starts = torch.zeros(S * n_q, dtype=torch.int64, device=dev)
        ends = torch.zeros(n_q, dtype=torch.int64, device=dev)
    part = torch.empty((S, n_q, KP), dtype=torch.int64, device=dev)
    if cfg["variant"] == "buffer":
        buf = torch.empty((S, n_q, C), dtype=torch.int64, device=dev)
        aux = torch.empty((S, n_q, 2), dtype=torch.int64, device=dev)
    else:
        buf = aux = part  # unused by the merge kernel
    if queries.dtype == torch.float32:
        prec = "tf32" if (dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        prec = "ieee"
    kern = KERNELS[cfg["variant"]]
    grid = (triton.cdiv(n_q, cfg["BM"]), S)
    LAST_LAUNCH["kernel"] = kern[grid](
        queries,
        keys,
        ids,
        starts,
        ends,
        buf,
        aux,
        part,
        n_q,
        n_k,
        d,
        chunk,
        queries.stride(0),
        keys.stride(0),
        cfg["k_eff"],
        KP=KP,
        C=C,
        BM=cfg["BM"],
        BN=cfg["BN"],
        BD=cfg["BD"],
        R=cfg["R"],
        E=excl_chunk,
        PREC=prec,
        WHILE_LOOP=backend.interpreting(),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    k_eff = cfg["k_eff"]
    if S == 1:
        top = part[0, :, :k_eff]
    else:
        top = torch.topk(part.permute(1, 0, 2).reshape(n_q, S * KP), k_eff, dim=1).values
    if k_eff < k:
        top = torch.cat([top, top.new_full((n_q, k - k_eff), EMPTY)], dim=1)
    return decode_rank_keys(top.contiguous())
