"""Compressed sparse rows (CSR) of int64 ids: the format of every exclusion/interaction list.

A CSR here is a pair (indptr [n_rows + 1], indices [nnz]) of int64 tensors; row r holds
indices[indptr[r]:indptr[r+1]]. `as_csr` accepts that pair, a torch.sparse_csr_tensor or any scipy.sparse
matrix, and checks it.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _checks


def validate_csr(indptr: torch.Tensor, indices: torch.Tensor, name: str, n_cols: int) -> None:
    """Value checks of an int64 CSR pair (they read the data, so ops run them inside the op body,
    where torch.compile sees real tensors): indptr starts at 0, never decreases, ends at nnz; ids are
    in [0, n_cols)."""
    if indptr.numel() == 0:
        raise ValueError(f"{name} indptr must have n_rows + 1 >= 1 entries, got 0")
    if int(indptr[0]) != 0:
        raise ValueError(f"{name} indptr must start at 0, got {int(indptr[0])}")
    if indptr.numel() > 1 and bool((indptr[1:] < indptr[:-1]).any()):
        raise ValueError(f"{name} indptr must be non-decreasing")
    if int(indptr[-1]) != indices.numel():
        raise ValueError(f"{name} indptr[-1] = {int(indptr[-1])} does not match the {indices.numel()} indices")
    _checks.index_range(indices, f"{name} indices", n_cols)


def as_csr(obj, name: str, n_rows: int, n_cols: int, device=None, canonical: bool = False,
           validate: bool = False, optional: bool = False):
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
        return (torch.zeros(n_rows + 1, dtype=torch.int64, device=device),
                torch.zeros(0, dtype=torch.int64, device=device))
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
        indptr, indices = (torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a for a in obj)
    else:
        raise TypeError(
            f"{name} must be a (indptr, indices) pair, a torch sparse CSR tensor or a scipy.sparse matrix, "
            f"got {type(obj).__name__}"
        )
    _checks.integer(indptr, f"{name} indptr", ndim=1)
    _checks.integer(indices, f"{name} indices", ndim=1)
    if indptr.numel() != n_rows + 1:
        raise ValueError(f"{name} indptr must have n_rows + 1 = {n_rows + 1} entries, got {indptr.numel()}")
    indptr = indptr.to(device=device, dtype=torch.int64)
    indices = indices.to(device=device, dtype=torch.int64)
    if validate:
        validate_csr(indptr, indices, name, n_cols)
    if canonical:
        if not validate:
            validate_csr(indptr, indices, name, n_cols)
        indptr, indices = canonicalize(indptr, indices, n_cols)
    return indptr.contiguous(), indices.contiguous()


def row_ids(indptr: torch.Tensor) -> torch.Tensor:
    """The row of every stored entry (int64 [nnz])."""
    counts = indptr[1:] - indptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=indptr.device), counts)


def canonicalize(indptr: torch.Tensor, indices: torch.Tensor, n_cols: int):
    """Sort ids within each row and remove repeats (vectorised; no Python loop over rows)."""
    n_rows = indptr.numel() - 1
    if indices.numel() == 0:
        return indptr.clone(), indices.clone()
    rows = row_ids(indptr)
    key = torch.unique(rows * n_cols + indices)  # sorted, unique
    new_rows = torch.div(key, n_cols, rounding_mode="floor")
    new_indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=indptr.device)
    new_indptr[1:] = torch.cumsum(torch.bincount(new_rows, minlength=n_rows), 0)
    return new_indptr, key - new_rows * n_cols


def transpose_csr(csr, n_cols: int, n_rows: int | None = None):
    """The transpose of a CSR: for each column id, the rows holding it (ids sorted, repeats removed).

    csr: anything `as_csr` accepts. n_cols: the number of columns (rows of the result). n_rows: the
    number of rows, inferred from a tensor pair when omitted. Returns (indptr [n_cols+1], indices), int64.
    Used to turn users' interactions into items' interactions (the item side of a teacher ranking).
    """
    if n_rows is None:
        if isinstance(csr, (tuple, list)) and len(csr) == 2:
            n_rows = len(csr[0]) - 1
        else:
            n_rows = csr.shape[0]
    indptr, indices = as_csr(csr, "csr", n_rows, n_cols, validate=True)
    rows = row_ids(indptr)
    key = torch.unique(indices * max(n_rows, 1) + rows)
    cols = torch.div(key, max(n_rows, 1), rounding_mode="floor")
    t_indptr = torch.zeros(n_cols + 1, dtype=torch.int64, device=indptr.device)
    t_indptr[1:] = torch.cumsum(torch.bincount(cols, minlength=n_cols), 0)
    return t_indptr, key - cols * max(n_rows, 1)
