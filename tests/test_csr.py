"""kdfast.csr: conversion, validation, canonical form and transpose of CSR id lists."""

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.csr import as_csr, canonicalize, row_ids, transpose_csr, validate_csr


def rows_of(indptr, indices):
    return [indices[indptr[r] : indptr[r + 1]].tolist() for r in range(len(indptr) - 1)]


def test_as_csr_forms_agree():
    dense = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    expected = ([0, 2, 2, 3], [1, 3, 0])
    forms = [
        (torch.tensor(expected[0]), torch.tensor(expected[1])),
        (np.array(expected[0]), np.array(expected[1])),
        [
            torch.tensor(expected[0], dtype=torch.int32),
            torch.tensor(expected[1], dtype=torch.int16),
        ],
        torch.tensor(dense, dtype=torch.float32).to_sparse_csr(),
        scipy.sparse.csr_matrix(dense),
        scipy.sparse.coo_matrix(dense),
        scipy.sparse.csc_matrix(dense),
    ]
    for f in forms:
        ip, ix = as_csr(f, "x", 3, 4, validate=True)
        assert ip.dtype == torch.int64 and ix.dtype == torch.int64
        assert ip.tolist() == expected[0] and ix.tolist() == expected[1]


@pytest.mark.parametrize(
    "obj, exc, frag",
    [
        ((torch.tensor([0, 1]), torch.tensor([0])), ValueError, "n_rows \\+ 1 = 4"),
        ((torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1])), ValueError, "non-decreasing"),
        ((torch.tensor([1, 1, 1, 1]), torch.tensor([0])), ValueError, "start at 0"),
        ((torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1])), ValueError, "does not match"),
        ((torch.tensor([0, 1, 1, 1]), torch.tensor([4])), ValueError, "outside"),
        ((torch.tensor([0, 1, 1, 1]), torch.tensor([-1])), ValueError, "outside"),
        ((torch.tensor([0, 1, 1, 1]), torch.tensor([0.5])), TypeError, "x indices"),
        ((torch.tensor([[0, 1, 1, 1]]), torch.tensor([0])), ValueError, "x indptr must be 1-D"),
        ("nope", TypeError, "x must be"),
        (scipy.sparse.csr_matrix(np.ones((2, 4))), ValueError, "3 rows"),
    ],
)
def test_as_csr_rejects(obj, exc, frag):
    with pytest.raises(exc, match=frag):
        as_csr(obj, "x", 3, 4, validate=True)


def test_validate_csr_empty_indptr():
    with pytest.raises(ValueError, match="n_rows \\+ 1 >= 1"):
        validate_csr(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), "x", 3)


def test_canonicalize_sorts_and_dedups_per_row():
    indptr = torch.tensor([0, 4, 4, 7])
    indices = torch.tensor([3, 1, 3, 0, 2, 2, 2])
    ip, ix = canonicalize(indptr, indices, 5)
    assert rows_of(ip, ix) == [[0, 1, 3], [], [2]]
    ip, ix = as_csr((indptr, indices), "x", 3, 5, canonical=True)
    assert rows_of(ip, ix) == [[0, 1, 3], [], [2]]
    ip, ix = canonicalize(torch.tensor([0, 0]), torch.zeros(0, dtype=torch.int64), 5)
    assert ip.tolist() == [0, 0] and ix.numel() == 0


def test_row_ids():
    assert row_ids(torch.tensor([0, 2, 2, 3])).tolist() == [0, 0, 2]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), max_size=8), min_size=1, max_size=8))
def test_transpose_matches_dense(rows):
    n_rows, n_cols = len(rows), 10
    indptr = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int64)
    indices = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    dense = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    for r, ids in enumerate(rows):
        dense[r, ids] = True
    tp, ti = transpose_csr((indptr, indices), n_cols)
    assert tp.shape == (n_cols + 1,)
    got = rows_of(tp, ti)
    assert got == [dense[:, c].nonzero().flatten().tolist() for c in range(n_cols)]
    ci, cx = canonicalize(indptr, indices, n_cols)
    assert rows_of(ci, cx) == [sorted(set(r)) for r in rows]
    # transposing twice gives the canonical original
    bp, bi = transpose_csr((tp, ti), n_rows)
    assert torch.equal(bp, ci) and torch.equal(bi, cx)


def test_transpose_other_forms_and_public_name():
    m = scipy.sparse.csr_matrix(np.array([[1, 0, 1], [0, 1, 1]]))
    tp, ti = kdfast.transpose_csr(m, 3)
    assert rows_of(tp, ti) == [[0], [1], [0, 1]]
    with pytest.raises(ValueError, match="outside"):
        transpose_csr((torch.tensor([0, 1]), torch.tensor([5])), 3)
