"""RRD - Relaxed Ranking Distillation (Kang et al., CIKM'20); docs/METHODS.md section 5.

From the frozen teacher's top-N list per user (training items excluded, computed once at build),
every epoch samples K "interesting" positions with p(r) ~ exp(-r / T), without replacement and kept
in teacher order, and L "uninteresting" items uniformly over the items neither observed nor in the
top-N. Per batch, for the batch's unique users U_b, the relaxed Plackett-Luce loss of the student's
scores s puts the K items (in order) above the L items (an unordered tail):

    L_RRD(u) = - sum_{k=1..K} [ s_k - log( sum_{j>=k} exp(s_j) + sum_{l=1..L} exp(sbar_l) ) ]
    L = lam * sum_{u in U_b} L_RRD(u)

computed by kdfast.ops.plackett_luce.plackett_luce_loss_from_embeddings. With sampling=False (the
authors' later no-sampling variant): the first K teacher items in order against ALL other unobserved
items as the tail, through kdfast.ops.full_catalog.full_catalog_listwise_loss.
"""

from __future__ import annotations

import torch

from .._core import checks
from .._core.csr import as_csr, select_rows
from .._core.numerics import gather_rows
from ..ops.full_catalog import full_catalog_listwise_loss
from ..sampling import exclusion_keys, rank_discounted_sample, uniform_excluding_sample
from .base import (
    BACKEND,
    KDMethod,
    check_teacher,
    checked_options,
    sample_rows_loss,
    sampler_backend,
    teacher_top,
    unique_ids,
)


class RankingSide:
    """One side (users -> items, or items -> users) of the ranking knowledge and its samples.

    top [R, N]: the teacher's ids per row in order; excl: the rows' training CSR; n_ids: the number
    of ids ranked; k interesting positions and n_unint uninteresting ids per row and epoch,
    p(r) ~ exp(-r / temperature). After resample(): interesting [R, k] (teacher order),
    uninteresting [R, n_unint].
    """

    def __init__(self, top, excl, n_ids, k, n_unint, temperature, backend="auto"):
        self.top, self.excl, self.n_ids = top, excl, n_ids
        self.sampler_backend = sampler_backend(backend)
        self.k, self.n_unint, self.temperature = k, n_unint, temperature
        self.interesting = self.uninteresting = None
        self.forbidden = exclusion_keys(top.shape[0], n_ids, excl, top, device=top.device)

    def keep_rows(self, rows, world):
        """Keep only the given rows (those of one rank of `world`: rows[j] = j * world + rank),
        with the rank's samples of row r in row r // world."""
        self.top = self.top.index_select(0, rows)
        self.excl = select_rows(self.excl[0], self.excl[1], rows)
        self.forbidden = exclusion_keys(
            rows.numel(), self.n_ids, self.excl, self.top, device=self.top.device
        )
        self.world = world
        self.interesting = self.uninteresting = None

    #: rows of the tables: all of them (1), or one rank's of `world` (keep_rows)
    world = 1

    def sample_rows(self, rows):
        """(interesting, uninteresting) samples of the rows `rows` (int64 ids of the side)."""
        local = rows if self.world == 1 else torch.div(rows, self.world, rounding_mode="floor")
        return self.interesting.index_select(0, local), self.uninteresting.index_select(0, local)

    def resample(self, generator):
        """New interesting and uninteresting samples (in that order from the generator)."""
        rows, n = self.top.shape
        pos = rank_discounted_sample(
            rows,
            n,
            self.k,
            self.temperature,
            generator=generator,
            device=self.top.device,
            backend=self.sampler_backend,
        )
        self.interesting = torch.gather(self.top, 1, pos)
        self.uninteresting = uniform_excluding_sample(
            rows,
            self.n_ids,
            self.n_unint,
            excluded_keys=self.forbidden,
            generator=generator,
            device=self.top.device,
            backend=self.sampler_backend,
        )

    def loss(self, q_emb, k_emb, rows):
        """sum over `rows` of the relaxed Plackett-Luce loss of the current samples."""
        return sample_rows_loss(
            q_emb, k_emb, self.interesting, self.uninteresting, rows, self.world
        )


class RRD(KDMethod):
    """Relaxed Ranking Distillation (user side): the teacher's top of each user as a listwise
    target.

    Options (docs/METHODS.md section 5 defaults): N=500 (teacher list length), K=40 interesting
    ranks, L=40 uninteresting items, T=10.0, lam=0.001, sampling=True (False: the no-sampling
    variant with the whole unobserved catalog as tail; K then means the first K teacher items),
    backend="auto" (for the teacher top-N, the samplers - torch or cpp; any other request samples
    with "auto" - and the full-catalog loss). forward returns lam * sum over the batch's unique
    users of L_RRD(u).
    """

    name = "rrd"
    option_rules = {
        "N": checks.positive_int,
        "K": checks.positive_int,
        "L": checks.positive_int,
        "T": checks.positive_number,
        "lam": checks.positive_number,
        "sampling": checks.boolean,
        "backend": BACKEND,
    }

    def __init__(self, user_side: RankingSide, n_users, n_items, lam, sampling, backend, generator):
        super().__init__()
        self.user_side, self.n_users, self.n_items = user_side, n_users, n_items
        self.lam, self.sampling, self.backend, self.generator = lam, sampling, backend, generator

    @classmethod
    def check_relations(cls, options, label):
        if options["N"] < options["K"]:
            raise ValueError(f"{label}: N ({options['N']}) must be >= K ({options['K']})")

    @staticmethod
    def _user_knowledge(teacher_user, teacher_item, train, N, backend):
        """(n_users, n_items, training CSR, the teacher's top-N items per user)."""
        n_users, n_items = check_teacher(teacher_user, teacher_item, "rrd")
        excl = as_csr(train, "train", n_users, n_items, device=teacher_user.device, validate=True)
        top = teacher_top(teacher_user, teacher_item, N, excl, backend)
        return n_users, n_items, excl, top

    @classmethod
    @checked_options
    def build(
        cls,
        teacher_user,
        teacher_item,
        train,
        student_dim,
        *,
        generator=None,
        N=500,
        K=40,
        L=40,
        T=10.0,
        lam=1e-3,
        sampling=True,
        backend="auto",
    ):
        n_users, n_items, excl, top = cls._user_knowledge(
            teacher_user, teacher_item, train, N, backend
        )
        side = RankingSide(top, excl, n_items, K, L, T, backend)
        method = cls(side, n_users, n_items, lam, sampling, backend, generator)
        method._resample()
        return method

    def _resample(self):
        if self.sampling:
            self.user_side.resample(self.generator)

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        self._resample()

    def shard_users(self, rank, world, all_sum=None):
        """Each rank samples its own users' lists (see KDMethod.shard_users); the no-sampling
        variant has no per-epoch work and does not shard."""
        if not self.sampling:
            return False
        self._begin_shard(rank, world)
        self.user_side.keep_rows(self.own_users(self.user_side.top.device), world)
        self._resample()
        return True

    def _user_loss(self, student_user, student_item, ub):
        side = self.user_side
        if self.sampling:
            self.local_rows(ub)  # a sharded method holds its own users' samples only
            return side.loss(student_user, student_item, ub)
        excl = select_rows(side.excl[0], side.excl[1], ub)
        return full_catalog_listwise_loss(
            gather_rows(student_user, ub),
            student_item,
            side.top[ub, : side.k],
            exclude=excl,
            reduction="sum",
            backend=self.backend,
        )

    def forward(self, student_user, student_item, users, pos, neg):
        self.check_batch(student_user, student_item, users, pos, neg)
        ub = unique_ids(users, self.n_users)
        return self.lam * self._user_loss(student_user, student_item, ub)
