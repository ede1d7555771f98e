"""Compressed sparse rows (CSR) of int64 ids: the format of every exclusion and interaction list.

The public face of kdfast._core.csr (where the helpers live): `as_csr` checks and converts a CSR
argument, `transpose_csr` gives the item side of a users -> items CSR, and the small helpers below
are what a caller building its own lists needs.
"""

from ._core.csr import as_csr, canonicalize, row_ids, transpose_csr, validate_csr

__all__ = ["as_csr", "canonicalize", "row_ids", "transpose_csr", "validate_csr"]
