"""What the embedding form's torch and triton backends share around their kernels: the id checks
(the cpp kernel makes them as it reads the ids) and the `rows=` indirection, which those backends
take as gathered copies of the rows and scatter back in the backward (the cpp kernel reads through
it)."""

from __future__ import annotations

from ..._core import checks
from ..._core.numerics import gather_rows


def check_ids(ranked_idx, unranked_idx, rows, n_items, n_rows):
    """ValueError naming the argument for an id outside [0, n_items) or -1, or a row outside [0,
    n_rows)."""
    checks.index_range(ranked_idx, "ranked_idx", n_items, allow_pad=True)
    if unranked_idx is not None:
        checks.index_range(unranked_idx, "unranked_idx", n_items, allow_pad=True)
    if rows is not None:
        checks.index_range(rows, "rows", n_rows)


def take_rows(rows, *tensors):
    """Each tensor indexed by rows (None stays None; rows None leaves them as they are)."""
    if rows is None:
        return tensors
    return tuple(None if x is None else gather_rows(x, rows) for x in tensors)


def add_rows(values, rows, n_rows):
    """values [B, ...] summed into n_rows rows at `rows` (a repeated row adds up), or as they
    are."""
    if rows is None:
        return values
    out = values.new_zeros((n_rows,) + tuple(values.shape[1:]))
    return out.index_add_(0, rows, values)
