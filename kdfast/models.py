"""Recommendation models used as teachers and students: BPR-MF and LightGCN, and the saved-teacher
format.

Both expose `embeddings() -> (user [U, d], item [I, d])`, the tables whose dot products are the
scores (s_ui = <e_u, e_i>); the trainer and every KD method work on these tables only.
"""

from __future__ import annotations

import math
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


FORMATS = {"teacher": "kdfast-teacher-1", "student": "kdfast-student-1"}


def _id_list(ids, n, what):
    if ids is None:
        return None
    ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    if len(ids) != n:
        raise ValueError(f"{what} must have one id per row ({n}), got {len(ids)}")
    return ids


def save_embeddings(
    path, user, item, meta: dict, *, role: str = "teacher", user_ids=None, item_ids=None
) -> None:
    """Save a trained model's score tables, a file kdfast can reload (load_embeddings), evaluate
    (`kdfast evaluate FILE`) and export: a torch.save'd dict
        {"format": "kdfast-teacher-1" | "kdfast-student-1", "kdfast": version,
         "user": [U, d] float32, "item": [I, d] float32 (scores = user @ item.T),
         "meta": {model, dim, data fingerprint, data and training settings, metrics, ...},
         "user_ids": [U] original user ids or None, "item_ids": [I] original item ids or None}
    (ids as ints or strings: row r of "user" is the user user_ids[r] of the data file), written
    atomically (kdfast._core.files.atomic_write)."""
    if role not in FORMATS:
        raise ValueError(f"role must be one of {tuple(FORMATS)}, got {role!r}")
    blob = {
        "format": FORMATS[role],
        "kdfast": __version__,
        "user": user.detach().float().cpu().contiguous(),
        "item": item.detach().float().cpu().contiguous(),
        "meta": dict(meta),
        "user_ids": _id_list(user_ids, user.shape[0], "user_ids"),
        "item_ids": _id_list(item_ids, item.shape[0], "item_ids"),
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def save_teacher(path, user: torch.Tensor, item: torch.Tensor, meta: dict, **ids) -> None:
    """save_embeddings(role="teacher"): a trained teacher's tables and metadata (model, dim, data
    fingerprint, protocol, split seed, training seed, metrics ...); ids: user_ids=, item_ids=."""
    save_embeddings(path, user, item, meta, role="teacher", **ids)


def load_embeddings(path, *, role: str | None = None, expect: dict | None = None) -> dict:
    """A file save_embeddings wrote: {"role", "user", "item", "meta", "user_ids", "item_ids"}.

    role: "teacher" or "student" to accept only that role (None: either). expect: metadata entries
    that must match (e.g. data_fingerprint, protocol, split_seed, dim); a mismatch raises
    ValueError naming the entry, so tables are never used on other data or splits.
    """
    what = role or "model"
    retrain = (
        "delete it or pass another --teacher path to train a new teacher"
        if role == "teacher"
        else "it cannot be used"
    )
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file fails inside torch's unpickler in many ways
        raise ValueError(
            f"{what} file {path} is unreadable ({type(e).__name__}: {e}); {retrain}"
        ) from None
    roles = {v: k for k, v in FORMATS.items()}
    found = roles.get(blob.get("format")) if isinstance(blob, dict) else None
    if found is None or (role is not None and found != role):
        raise ValueError(f"{path} is not a kdfast {what} file; {retrain}")
    if not all(isinstance(blob.get(k), torch.Tensor) for k in ("user", "item")):
        raise ValueError(f"{what} file {path} holds no embedding tables; {retrain}")
    meta = blob.get("meta")
    if not isinstance(meta, dict):
        raise ValueError(f"{what} file {path} holds no metadata; {retrain}")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise ValueError(
                f"{what} file {path}: {key} is {meta.get(key)!r}, this run needs {want!r} "
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
            f"{what} file {path} holds malformed embeddings "
            f"{tuple(user.shape)}, {tuple(item.shape)}"
        )
    return {
        "role": found,
        "user": user,
        "item": item,
        "meta": meta,
        "user_ids": blob.get("user_ids"),
        "item_ids": blob.get("item_ids"),
    }


def load_teacher(path, *, expect: dict | None = None):
    """A saved teacher (load_embeddings(role="teacher")): returns (user [U, d], item [I, d],
    meta)."""
    got = load_embeddings(path, role="teacher", expect=expect)
    return got["user"], got["item"], got["meta"]
