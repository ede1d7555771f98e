"""Ranking distillation: RRD (CIKM'20) and IR-RRD (Information Sciences'21); docs/METHODS.md sections 5 and 6.

RRD: from the frozen teacher's top-N list per user (training items excluded, computed once), every
epoch sample K "interesting" positions (p(r) ~ exp(-r/T), without replacement, kept in teacher order)
and L "uninteresting" items (uniform over items neither observed nor in the top-N); per batch, for the
batch's unique users, the relaxed Plackett-Luce loss of the student's scores of the K items above the L
items, times lambda. With sampling=False (the later "no-sampling" variant): the first K teacher items in
order against ALL other unobserved items, through kdfast.full_catalog_listwise_loss.
IR-RRD adds the same loss with users and items swapped (each item's teacher top-N users).
"""
from __future__ import annotations

import math

import torch

from .._core import checks as _checks
from .._core.csr import as_csr, transpose_csr
from ..ops.full_catalog import full_catalog_listwise_loss
from ..ops.plackett_luce import plackett_luce_loss_from_embeddings
from ..ops.topk import topk_scores
from ..sampling import exclusion_keys, rank_discounted_sample, uniform_excluding_sample
from .base import KDMethod


def _csr_rows(indptr, indices, rows):
    """The sub-CSR of the given rows (vectorised)."""
    starts, ends = indptr[rows], indptr[rows + 1]
    counts = ends - starts
    sub_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=indptr.device)
    sub_ptr[1:] = torch.cumsum(counts, 0)
    offs = torch.arange(int(sub_ptr[-1]), device=indptr.device) - torch.repeat_interleave(sub_ptr[:-1], counts)
    return sub_ptr, indices[torch.repeat_interleave(starts, counts) + offs]


def _teacher_top(queries, keys, n, excl, backend):
    """Teacher top-n ids per query (training interactions excluded); every query must have n candidates."""
    counts = excl[0][1:] - excl[0][:-1]
    short = keys.shape[0] - int(counts.max()) if counts.numel() else keys.shape[0]
    _, idx = topk_scores(queries, keys, n, exclude=excl, backend=backend)
    if bool((idx < 0).any()):
        raise ValueError(f"N = {n} is larger than the number of unobserved candidates of some row "
                         f"(as few as {short}); lower N")
    return idx


class _Side:
    """One side (users -> items, or items -> users) of the ranking knowledge and its samples."""

    def __init__(self, top, excl, n_ids, k, n_unint, temperature, backend="auto"):
        self.top, self.excl, self.n_ids = top, excl, n_ids
        # the samplers have torch and cpp backends; a triton request samples with torch
        self.sampler_backend = backend if backend in ("torch", "cpp") else "auto"
        self.k, self.n_unint, self.temperature = k, n_unint, temperature
        self.interesting = self.uninteresting = None
        self.forbidden = exclusion_keys(top.shape[0], n_ids, excl, top, device=top.device)

    def resample(self, generator):
        rows, n = self.top.shape
        pos = rank_discounted_sample(rows, n, self.k, self.temperature, generator=generator, device=self.top.device,
                                     backend=self.sampler_backend)
        self.interesting = torch.gather(self.top, 1, pos)
        self.uninteresting = uniform_excluding_sample(rows, self.n_ids, self.n_unint, excluded_keys=self.forbidden,
                                                      generator=generator, device=self.top.device,
                                                      backend=self.sampler_backend)

    def loss(self, q_emb, k_emb, rows):
        return plackett_luce_loss_from_embeddings(q_emb, k_emb, self.interesting, self.uninteresting, rows=rows,
                                                  reduction="sum")


def _check_batch(student_user, student_item, users, pos, neg, n_users, n_items):
    _checks.floating(student_user, "student_user", ndim=2)
    _checks.floating(student_item, "student_item", ndim=2)
    if student_user.shape[0] != n_users or student_item.shape[0] != n_items:
        raise ValueError(f"student tables must have {n_users} users and {n_items} items, got "
                         f"{tuple(student_user.shape)} and {tuple(student_item.shape)}")
    for name, t in (("users", users), ("pos", pos), ("neg", neg)):
        _checks.integer(t, name, ndim=1)
    if not users.shape[0] == pos.shape[0] == neg.shape[0]:
        raise ValueError(f"users, pos and neg must have the same length, got {users.shape[0]}, {pos.shape[0]}, {neg.shape[0]}")
    _checks.index_range(users, "users", n_users)  # pos is checked where it is used; neg is not used


def _unique_ids(ids, n):
    """The sorted distinct ids of an int64 vector with values in [0, n) (a bincount, not a sort)."""
    return torch.nonzero(torch.bincount(ids, minlength=n)).flatten()


# rows per block when scoring [rows, m] id lists (bounds the gathered [rows, m, d] tensor)
_BLOCK_ELEMS = 1 << 24


def _row_scores(q_emb, k_emb, ids):
    """s[r, j] = <q_emb[r], k_emb[ids[r, j]]> for every row r of ids [R, m] (ids >= 0), blocked over rows so
    that the gathered rows never exceed 2^24 elements. For per-epoch work without gradient (RD's rank
    estimate, DCD's ranks within the teacher list)."""
    rows, m = ids.shape
    step = max(1, _BLOCK_ELEMS // max(1, m * q_emb.shape[1]))
    out = [torch.einsum("ud,umd->um", q_emb[lo:lo + step], k_emb[ids[lo:lo + step]])
           for lo in range(0, rows, step)]
    return torch.cat(out) if out else q_emb.new_zeros((0, m))


def _positive_number(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name} must be a number > 0, got {v!r}")
    return float(v)


def _finite_positive(v, name):
    v = _positive_number(v, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return v


def _nonneg_int(v, name):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return v


def _as_bool(v, name):
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


class RRD(KDMethod):
    """Relaxed Ranking Distillation (user side).

    Options (docs/METHODS.md section 5 defaults): N=500 (teacher list length), K=40 interesting ranks, L=40 uninteresting
    items, T=10.0, lam=0.001, sampling=True (False: the no-sampling variant with the whole unobserved
    catalog as tail; K then means the first K teacher items), backend="auto" (for the teacher top-N,
    the samplers - torch or cpp; a triton request samples with "auto" - and the full-catalog loss).
    forward returns lam * sum over the batch's unique users of L_RRD(u).
    """

    name = "rrd"

    def __init__(self, user_side: _Side, n_users, n_items, lam, sampling, backend, generator):
        super().__init__()
        self.user_side, self.n_users, self.n_items = user_side, n_users, n_items
        self.lam, self.sampling, self.backend, self.generator = lam, sampling, backend, generator

    @staticmethod
    def _common(teacher_user, teacher_item, train, N, K, L, T, backend):
        _checks.floating(teacher_user, "teacher_user", ndim=2)
        _checks.floating(teacher_item, "teacher_item", ndim=2)
        n_users, n_items = teacher_user.shape[0], teacher_item.shape[0]
        N, K, L = (_checks.positive_int(v, name) for v, name in ((N, "N"), (K, "K"), (L, "L")))
        if N < K:
            raise ValueError(f"N ({N}) must be >= K ({K})")
        T = _positive_number(T, "T")
        device = teacher_user.device
        excl = as_csr(train, "train", n_users, n_items, device=device, validate=True)
        with torch.no_grad():
            top = _teacher_top(teacher_user.detach(), teacher_item.detach(), N, excl, backend)
        return n_users, n_items, excl, top, N, K, L, T

    @classmethod
    def build(cls, teacher_user, teacher_item, train, student_dim, *, generator=None, N=500, K=40, L=40,
              T=10.0, lam=1e-3, sampling=True, backend="auto"):
        n_users, n_items, excl, top, N, K, L, T = cls._common(teacher_user, teacher_item, train, N, K, L, T, backend)
        side = _Side(top, excl, n_items, K, L, T, backend)
        method = cls(side, n_users, n_items, _positive_number(lam, "lam"), bool(sampling), backend, generator)
        method._resample()
        return method

    def _resample(self):
        if self.sampling:
            self.user_side.resample(self.generator)

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        self._resample()

    def _user_loss(self, student_user, student_item, ub):
        side = self.user_side
        if self.sampling:
            return side.loss(student_user, student_item, ub)
        excl = _csr_rows(side.excl[0], side.excl[1], ub)
        return full_catalog_listwise_loss(student_user[ub], student_item, side.top[ub, :side.k], exclude=excl,
                                          reduction="sum", backend=self.backend)

    def forward(self, student_user, student_item, users, pos, neg):
        _check_batch(student_user, student_item, users, pos, neg, self.n_users, self.n_items)
        ub = _unique_ids(users, self.n_users)
        return self.lam * self._user_loss(student_user, student_item, ub)


class IRRRD(RRD):
    """IR-RRD: RRD plus the item-side ranking regulariser (docs/METHODS.md section 6).

    Extra options: K_I=20 interesting users, L_I=20 uninteresting users per item, N_I (length of each
    item's teacher list of users; default N = 500), lam_ir=0.0005,
    item_source="samples" (the items of a step are the unique items among the batch users' RRD samples,
    as in the paper) or "pos" (the unique positive items of the batch: cheaper).
    forward returns lam * L_RRD + lam_ir * L_IR.
    """

    name = "ir-rrd"

    @classmethod
    def build(cls, teacher_user, teacher_item, train, student_dim, *, generator=None, N=500, K=40, L=40,
              T=10.0, lam=1e-3, K_I=20, L_I=20, N_I=None, lam_ir=5e-4, item_source="samples", sampling=True,
              backend="auto"):
        if item_source not in ("samples", "pos"):
            raise ValueError(f"item_source must be 'samples' or 'pos', got {item_source!r}")
        n_users, n_items, excl, top, N, K, L, T = cls._common(teacher_user, teacher_item, train, N, K, L, T, backend)
        K_I, L_I = _checks.positive_int(K_I, "K_I"), _checks.positive_int(L_I, "L_I")
        N_I = N if N_I is None else _checks.positive_int(N_I, "N_I")
        if N_I < K_I:
            raise ValueError(f"N_I ({N_I}) must be >= K_I ({K_I})")
        excl_t = transpose_csr(excl, n_items, n_users)
        with torch.no_grad():
            top_t = _teacher_top(teacher_item.detach(), teacher_user.detach(), N_I, excl_t, backend)
        method = cls(_Side(top, excl, n_items, K, L, T, backend), n_users, n_items, _positive_number(lam, "lam"),
                     bool(sampling), backend, generator)
        method.item_side = _Side(top_t, excl_t, n_users, K_I, L_I, T, backend)
        method.lam_ir = _positive_number(lam_ir, "lam_ir")
        method.item_source = item_source
        method._resample()
        return method

    def _resample(self):
        super()._resample()
        if hasattr(self, "item_side"):
            self.item_side.resample(self.generator)

    def forward(self, student_user, student_item, users, pos, neg):
        _check_batch(student_user, student_item, users, pos, neg, self.n_users, self.n_items)
        ub = _unique_ids(users, self.n_users)
        loss = self.lam * self._user_loss(student_user, student_item, ub)
        if self.item_source == "pos" or not self.sampling:
            _checks.index_range(pos, "pos", self.n_items)
            items = _unique_ids(pos, self.n_items)
        else:
            side = self.user_side
            ids = torch.cat([side.interesting[ub].flatten(), side.uninteresting[ub].flatten()])
            items = _unique_ids(ids, self.n_items)
        return loss + self.lam_ir * self.item_side.loss(student_item, student_user, items)
