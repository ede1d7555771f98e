"""Recommendation models used as teachers and students: BPR-MF and LightGCN, and the saved-teacher
format.

Both expose `embeddings() -> (user [U, d], item [I, d])`, the tables whose dot products are the
scores (s_ui = <e_u, e_i>); the trainer and every KD method work on these tables only.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch

from . import __version__
from ._core.csr import row_ids
from ._core.files import atomic_write


class BPRMF(torch.nn.Module):
    """Matrix factorisation scored by dot products (BPR-MF, docs/METHODS.md section 1).

    n_users, n_items: table sizes; dim: embedding dimension (any >= 1).
    Embeddings are initialised N(0, std=0.01) with the given torch.Generator (or the global one).
    """

    kind = "bprmf"

    def __init__(
        self, n_users: int, n_items: int, dim: int, *, generator: torch.Generator | None = None
    ):
        super().__init__()
        for name, v in (("n_users", n_users), ("n_items", n_items), ("dim", dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.user = torch.nn.Embedding(n_users, dim)
        self.item = torch.nn.Embedding(n_items, dim)
        with torch.no_grad():
            self.user.weight.normal_(0.0, 0.01, generator=generator)
            self.item.weight.normal_(0.0, 0.01, generator=generator)

    def embeddings(self):
        """(user [U, d], item [I, d]): the weight tables themselves (with gradient)."""
        return self.user.weight, self.item.weight

    def config(self) -> dict:
        return {"model": self.kind, "dim": self.dim}


def normalized_adjacency(train, n_users: int, n_items: int) -> torch.Tensor:
    """The symmetric-normalised bipartite adjacency D^-1/2 A D^-1/2 of the training graph, as a
    sparse tensor of size (U + I) x (U + I) (float32, coalesced COO). train: int64 CSR pair users ->
    items."""
    indptr, indices = train
    rows = row_ids(indptr)
    cols = indices + n_users
    deg = torch.zeros(n_users + n_items, dtype=torch.float64)
    deg.index_add_(0, rows, torch.ones(rows.numel(), dtype=torch.float64))
    deg.index_add_(0, cols, torch.ones(cols.numel(), dtype=torch.float64))
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    r = torch.cat([rows, cols])
    c = torch.cat([cols, rows])
    vals = (inv[r] * inv[c]).to(torch.float32)
    n = n_users + n_items
    return torch.sparse_coo_tensor(
        torch.stack([r, c]), vals, (n, n), check_invariants=True
    ).coalesce()


class LightGCN(torch.nn.Module):
    """LightGCN (He et al., SIGIR'20): E^(k+1) = A_hat E^(k), final embedding = mean of E^(0..L).

    n_users, n_items, dim: as BPRMF; train: the training interactions (int64 CSR pair users ->
    items), which define the graph; n_layers: L (default 2). Initialisation N(0, 0.01) as BPRMF.
    """

    kind = "lightgcn"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        train,
        *,
        n_layers: int = 2,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(n_layers, int) or n_layers < 0:
            raise ValueError(f"n_layers must be a non-negative int, got {n_layers!r}")
        self.base = BPRMF(n_users, n_items, dim, generator=generator)
        self.n_users, self.n_items, self.dim, self.n_layers = n_users, n_items, dim, n_layers
        self.register_buffer("adj", normalized_adjacency(train, n_users, n_items), persistent=False)

    def embeddings(self):
        """(user [U, d], item [I, d]) after propagation (differentiable w.r.t. the base tables)."""
        e = torch.cat([self.base.user.weight, self.base.item.weight])
        total = e
        for _ in range(self.n_layers):
            e = torch.sparse.mm(self.adj, e)
            total = total + e
        total = total / (self.n_layers + 1)
        return total[: self.n_users], total[self.n_users :]

    def config(self) -> dict:
        return {"model": self.kind, "dim": self.dim, "n_layers": self.n_layers}


MODELS = ("bprmf", "lightgcn", "cml", "neumf", "multvae", "iae")


def build_model(kind: str, n_users: int, n_items: int, dim: int, train, *, generator=None):
    """BPRMF ("bprmf"/"bpr"/"mf"), LightGCN ("lightgcn"), or a family of kdfast.families ("cml",
    "neumf", "multvae", "iae") with its default hyper-parameters."""
    if kind in ("bprmf", "bpr", "mf"):
        return BPRMF(n_users, n_items, dim, generator=generator)
    if kind == "lightgcn":
        return LightGCN(n_users, n_items, dim, train, generator=generator)
    from .families import FAMILIES, build_family

    if kind in FAMILIES:
        return build_family(kind, n_users, n_items, dim, train, generator=generator)
    raise ValueError(f"model must be one of {MODELS}, got {kind!r}")


def save_teacher(path, user: torch.Tensor, item: torch.Tensor, meta: dict) -> None:
    """Save a trained teacher: its score embeddings (user [U, d], item [I, d], float32) and metadata
    (model, dim, data fingerprint, protocol, split seed, training seed, metrics ...), with
    torch.save, written atomically (kdfast._core.files.atomic_write)."""
    blob = {
        "format": "kdfast-teacher-1",
        "kdfast": __version__,
        "user": user.detach().float().cpu().contiguous(),
        "item": item.detach().float().cpu().contiguous(),
        "meta": dict(meta),
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def load_teacher(path, *, expect: dict | None = None):
    """Load a saved teacher: returns (user [U, d], item [I, d], meta).

    expect: metadata entries that must match (e.g. data_fingerprint, protocol, split_seed, dim); a
    mismatch raises ValueError naming the entry, so a teacher is never reused on other data or
    splits.
    """
    retrain = "delete it or pass another --teacher path to train a new teacher"
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, pickle.UnpicklingError) as e:
        raise ValueError(f"teacher file {path} is unreadable ({e}); {retrain}") from None
    if not isinstance(blob, dict) or blob.get("format") != "kdfast-teacher-1":
        raise ValueError(f"{path} is not a kdfast teacher file; {retrain}")
    if not all(isinstance(blob.get(k), torch.Tensor) for k in ("user", "item")):
        raise ValueError(f"teacher file {path} holds no embedding tables; {retrain}")
    meta = blob.get("meta")
    if not isinstance(meta, dict):
        raise ValueError(f"teacher file {path} holds no metadata; {retrain}")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise ValueError(
                f"teacher file {path}: {key} is {meta.get(key)!r}, this run needs {want!r} "
                f"(use another --teacher path, or delete the file to retrain)"
            )
    user, item = blob["user"], blob["item"]
    if (
        user.dim() != 2
        or item.dim() != 2
        or user.shape[1] != item.shape[1]
        or not math.isfinite(float(user.abs().sum()))
    ):
        raise ValueError(
            f"teacher file {path} holds malformed embeddings "
            f"{tuple(user.shape)}, {tuple(item.shape)}"
        )
    return user, item, meta
