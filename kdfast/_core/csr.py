"""Compressed sparse rows (CSR) of int64 ids: the format of every exclusion and interaction list.

A CSR here is a pair (indptr [n_rows + 1], indices [nnz]) of int64 tensors; row r holds
indices[indptr[r]:indptr[r+1]]. `as_csr` accepts that pair, a torch.sparse_csr_tensor or any
scipy.sparse matrix, and checks it. Every helper is vectorised (no Python loop over rows) and keeps
the device of its input.

Pair keys: the sorted int64 keys row * n_cols + id of a CSR's entries, for membership tests by
binary search (pair_keys, has_pair).
"""

from __future__ import annotations

import numpy as np
import torch

from . import checks


def validate_csr(indptr: torch.Tensor, indices: torch.Tensor, name: str, n_cols: int) -> None:
    """Value checks of an int64 CSR pair (they read the data, so ops run them inside the op body,
    where torch.compile sees real tensors): indptr starts at 0, never decreases, ends at nnz; ids
    are in [0, n_cols)."""
    if indptr.numel() == 0:
        raise ValueError(f"{name} indptr must have n_rows + 1 >= 1 entries, got 0")
    if int(indptr[0]) != 0:
        raise ValueError(f"{name} indptr must start at 0, got {int(indptr[0])}")
    if indptr.numel() > 1 and bool((indptr[1:] < indptr[:-1]).any()):
        raise ValueError(f"{name} indptr must be non-decreasing")
    if int(indptr[-1]) != indices.numel():
        raise ValueError(
            f"{name} indptr[-1] = {int(indptr[-1])} does not match the {indices.numel()} indices"
        )
    checks.index_range(indices, f"{name} indices", n_cols)


def empty(n_rows: int, device=None):
    """The CSR with n_rows empty rows."""
    return (
        torch.zeros(n_rows + 1, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
    )


def as_csr(
    obj,
    name: str,
    n_rows: int,
    n_cols: int,
    device=None,
    canonical: bool = False,
    validate: bool = False,
    optional: bool = False,
):
    """Check and convert a CSR argument to (indptr, indices) int64 tensors on `device`.

    obj: (indptr, indices) tensors/arrays, a torch sparse CSR tensor, or a scipy.sparse matrix.
    n_rows/n_cols: the expected number of rows and the id bound (ids must be in [0, n_cols)).
    canonical: also sort the ids inside each row and drop repeats (kernels that merge against
    sorted lists ask for this; implies validate).
    optional: None is accepted and means an empty CSR (no ids in any row).
    validate: run validate_csr here (ops under torch.compile validate inside the op body instead).
    Raises ValueError/TypeError naming `name` for a wrong length, a decreasing indptr, ids out of
    range or non-integer ids.
    """
    if obj is None and optional:
        return empty(n_rows, device)
    if isinstance(obj, torch.Tensor) and obj.layout == torch.sparse_csr:
        if obj.dim() != 2 or obj.shape[0] != n_rows:
            raise ValueError(f"{name} must have {n_rows} rows, got shape {tuple(obj.shape)}")
        indptr, indices = obj.crow_indices(), obj.col_indices()
    elif hasattr(obj, "tocsr") and hasattr(obj, "shape"):  # scipy.sparse
        m = obj.tocsr()
        if m.shape[0] != n_rows:
            raise ValueError(f"{name} must have {n_rows} rows, got shape {m.shape}")
        indptr = torch.from_numpy(np.asarray(m.indptr, dtype=np.int64))
        indices = torch.from_numpy(np.asarray(m.indices, dtype=np.int64))
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        indptr, indices = (
            a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a)) for a in obj
        )
    else:
        raise TypeError(
            f"{name} must be a (indptr, indices) pair, a torch sparse CSR tensor or a scipy.sparse "
            f"matrix, got {type(obj).__name__}"
        )
    checks.integer(indptr, f"{name} indptr", ndim=1)
    checks.integer(indices, f"{name} indices", ndim=1)
    if indptr.numel() != n_rows + 1:
        raise ValueError(
            f"{name} indptr must have n_rows + 1 = {n_rows + 1} entries, got {indptr.numel()}"
        )
    indptr = indptr.to(device=device, dtype=torch.int64)
    indices = indices.to(device=device, dtype=torch.int64)
    if validate or canonical:
        validate_csr(indptr, indices, name, n_cols)
    if canonical:
        indptr, indices = canonicalize(indptr, indices, n_cols)
    return indptr.contiguous(), indices.contiguous()


def lengths(indptr: torch.Tensor) -> torch.Tensor:
    """The number of entries of every row (int64 [n_rows])."""
    return indptr[1:] - indptr[:-1]


def row_ids(indptr: torch.Tensor) -> torch.Tensor:
    """The row of every stored entry (int64 [nnz])."""
    counts = lengths(indptr)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=indptr.device), counts)


def from_counts(counts: torch.Tensor) -> torch.Tensor:
    """The indptr [n + 1] of rows with the given entry counts."""
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr


def from_entries(rows: torch.Tensor, ids: torch.Tensor, n_rows: int):
    """The CSR of (row, id) entries given in any order (stable: a row keeps its ids' given
    order)."""
    order = torch.argsort(rows, stable=True)
    return from_counts(torch.bincount(rows, minlength=n_rows)), ids[order]


def from_lists(lists, n_rows: int):
    """The CSR of Python/numpy id lists, one per row, ids sorted within each row."""
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in lists])
    if lists:
        indices = np.concatenate([np.sort(np.asarray(r, dtype=np.int64)) for r in lists])
    else:
        indices = np.zeros(0, np.int64)
    return torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int64))


def canonical_entries(rows: torch.Tensor, ids: torch.Tensor, n_rows: int, n_cols: int):
    """The canonical CSR (ids sorted within each row, no repeats) of (row, id) entries given in any
    order: the sorted unique keys row * n_cols + id are that CSR, so one sort makes it."""
    key = torch.unique(rows * n_cols + ids)
    new_rows = torch.div(key, n_cols, rounding_mode="floor")
    return from_counts(torch.bincount(new_rows, minlength=n_rows)), key - new_rows * n_cols


def canonicalize(indptr: torch.Tensor, indices: torch.Tensor, n_cols: int):
    """Sort ids within each row and remove repeats."""
    if indices.numel() == 0:
        return indptr.clone(), indices.clone()
    return canonical_entries(row_ids(indptr), indices, indptr.numel() - 1, n_cols)


def rows_sorted(indptr: torch.Tensor, indices: torch.Tensor) -> bool:
    """Whether the ids inside every row are non-decreasing."""
    if indices.numel() < 2:
        return True
    ok = indices[1:] >= indices[:-1]
    starts = indptr[1:-1]
    starts = starts[(starts > 0) & (starts < indices.numel())]
    ok[starts - 1] = True  # a new row may start lower
    return bool(ok.all())


def select_rows(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor):
    """The sub-CSR of the given rows (int64 [n], in that order; a row may repeat)."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    sub_ptr = from_counts(counts)
    offs = torch.arange(int(sub_ptr[-1]), device=indptr.device) - torch.repeat_interleave(
        sub_ptr[:-1], counts
    )
    return sub_ptr, indices[torch.repeat_interleave(starts, counts) + offs]


def concat_rows(a, b):
    """Row-wise concatenation of two CSR pairs with the same rows (ids of a, then of b, per row)."""
    n = a[0].numel() - 1
    rows = torch.cat([row_ids(a[0]), row_ids(b[0])])
    return from_entries(rows, torch.cat([a[1], b[1]]), n)


def with_ids(indptr: torch.Tensor, indices: torch.Tensor, extra: torch.Tensor, n_cols: int):
    """One canonical CSR (sorted ids, no repeats) of each row's ids plus the non-padding (>= 0) ids
    of extra[row] (int64 [n_rows, M], -1 padding)."""
    n_rows = indptr.numel() - 1
    rows, ids = row_ids(indptr), indices
    if extra.numel():
        valid = extra >= 0
        extra_rows = torch.arange(n_rows, device=extra.device)[:, None].expand_as(extra)[valid]
        rows, ids = torch.cat([rows, extra_rows]), torch.cat([ids, extra[valid]])
    return canonical_entries(rows, ids, n_rows, n_cols)


def map_ids(indptr: torch.Tensor, indices: torch.Tensor, mapping: torch.Tensor):
    """The CSR with each id replaced by mapping[id] (int64), entries mapped to -1 dropped."""
    mapped = mapping[indices]
    keep = mapped >= 0
    rows = row_ids(indptr)[keep]
    return from_counts(torch.bincount(rows, minlength=indptr.numel() - 1)), mapped[keep]


def transpose_csr(csr, n_cols: int, n_rows: int | None = None):
    """The transpose of a CSR: for each column id, the rows holding it (ids sorted, repeats
    removed).

    csr: anything `as_csr` accepts. n_cols: the number of columns (rows of the result). n_rows: the
    number of rows, inferred from a tensor pair when omitted. Returns (indptr [n_cols+1], indices),
    int64. Used to turn users' interactions into items' interactions (the item side of a teacher
    ranking).
    """
    if n_rows is None:
        if isinstance(csr, (tuple, list)) and len(csr) == 2:
            n_rows = len(csr[0]) - 1
        else:
            n_rows = csr.shape[0]
    indptr, indices = as_csr(csr, "csr", n_rows, n_cols, validate=True)
    return canonical_entries(indices, row_ids(indptr), n_cols, max(n_rows, 1))


def pair_keys(indptr: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The sorted, unique int64 keys row * n_cols + id of every entry."""
    return torch.unique(row_ids(indptr) * n_cols + indices)


def has_pair(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """For int64 query keys (any shape), whether each is among the sorted keys (binary search)."""
    if keys.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool)
    pos = torch.searchsorted(keys, query.reshape(-1)).clamp_max(keys.numel() - 1)
    return (keys[pos] == query.reshape(-1)).reshape(query.shape)
