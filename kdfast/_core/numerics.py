"""Numerics shared by the ops: the accumulation dtype, loss reductions, row gathers with
reproducible gradients, safe row normalisation, and the rank keys that define the top-K order on
every backend."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel accumulates in: float64 for float64 inputs, float32 for everything
    else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_rows(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses reduced as `reduction` says: "none" (as they are), "sum", or "mean" over
    rows."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.mean()


def gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx]: the rows of table at int64 ids of any shape ([*idx.shape, *table.shape[1:]]),
    whose gradient sums each row in a fixed order, so that it has the same bits run to run. Advanced
    indexing backpropagates through index_put_(accumulate=True), which adds with atomics on several
    CPU threads. On the CPU index_select's backward (index_add_, in index order) gives the bits of
    F.embedding's at 2-3x less time (a [22350] gather from a 25181 x 20 table: 1.1 ms against
    2.2-3.1 ms); on a GPU index_add_ uses atomics, so 2-D tables there go through F.embedding."""
    if table.dim() == 2 and table.device.type != "cpu":
        return torch.nn.functional.embedding(idx, table)
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


def inv_norms(x: torch.Tensor) -> torch.Tensor:
    """[N, 1] 1 / ||x_row||, and 0 for rows of norm 0. The norm is taken of the row divided by its
    largest magnitude (then multiplied back), so rows far from 1 in scale (1e20 or 1e-25 in float32,
    whose squares overflow or underflow) keep their exact direction."""
    m = x.detach().abs().amax(dim=1, keepdim=True)
    m = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    n = torch.linalg.vector_norm(x / m, dim=1, keepdim=True) * m
    pos = n > 0
    return torch.where(pos, 1.0 / torch.where(pos, n, torch.ones_like(n)), torch.zeros_like(n))


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| row-wise; rows of norm 0 map to 0 with gradient 0 (never NaN)."""
    return x * inv_norms(x)


# ---------------------------------------------------------------------------------------- rank keys
# The top-K order of every backend: descending score, ties to the LOWER key index, -0.0 equals
# +0.0, and a score that is not finite (NaN, or a float32 dot product that overflowed to +-inf,
# whose sign would depend on the summation order) ranks as -inf. One total order on int64 rank keys
# implements it:
#     key = ordered(score) * 2^32 + (2^32 - 1 - index)
# where ordered() maps float32 bits to an int32 that sorts like the float. Keys are unique per row,
# so an int64 top-k on them is exact and deterministic. Excluded keys and empty slots take the key
# EMPTY and come out as index -1, value -inf.
EMPTY = -(2**63)
_LOW = (1 << 32) - 1


def encode_rank_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rank keys (int64) of float32 scores at the given int64 key indices (broadcastable)."""
    s = scores.to(torch.float32)
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("-inf"))) + 0.0  # -0 -> +0
    b = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return ordered * (1 << 32) + (_LOW - index)


def decode_rank_keys(keys: torch.Tensor):
    """(values float32, indices int64) of rank keys; EMPTY gives (-inf, -1)."""
    empty = keys == EMPTY
    low = keys & _LOW
    index = _LOW - low
    ordered = torch.div(keys - low, 1 << 32, rounding_mode="floor")
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(torch.int32)
    # torch.where rather than masked assignment: inductor cannot re-index an in-place write into a
    # dtype view, and torch.compile of the reference is one of the benchmark baselines.
    values = torch.where(empty, float("-inf"), bits.view(torch.float32))
    return values, torch.where(empty, -1, index)
