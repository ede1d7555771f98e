"""DCD - Dual Correction strategy for ranking Distillation (Lee & Kim, CIKM'21); docs/METHODS.md
section 8.

Knowledge: the frozen teacher's top-N list per user (and, on the item side, per item: its top-N
users), training interactions excluded, computed once at build. Every epoch (start_epoch), from the
student's current tables:

  rank_T(u, i) = position of i in u's teacher list (0-based; ties to the lower id, as
                 kdfast.topk_scores);
  rank_S(u, i) = [rank="catalog"] the student's 0-based rank of i among u's unobserved items = the
                 number of unobserved items the student scores strictly higher (ties to the lower
                 id), or [rank="list"] the position of i in the teacher list re-sorted by the
                 student's scores (the authors' code);
  d(u, i)      = rank_S - rank_T.

  under-estimated candidates: the N teacher items, p_under(i) = tanh(max(d / eps, 0));
  over-estimated candidates:  [over="teacher"] the N teacher items,
                              p_over(i) = tanh(max(-d / eps, 0)),
                              or [over="student"] the student's own top-N items j
                              (rank_S(j) = 0..N-1) with
                              p_over(j) = tanh(max((rank_T(j) - rank_S(j)) / eps, 0)),
                              rank_T the teacher's rank of j among u's unobserved items.

K items are drawn per side WITHOUT replacement with probability proportional to p (successive draws,
the law of torch.multinomial(p, K, replacement=False), which the authors call), by Gumbel-top-K: the
K largest log p + Gumbel noise, entries with p = 0 excluded. A row with fewer than K positive
entries gets all of them and -1 padding; a row with none contributes nothing. The under-estimated
sample is kept in teacher order. Per batch, for the batch's unique users (and, on the item side, the
batch's unique positive items, as in the authors' code):

  L_UCD(u) = relaxed Plackett-Luce loss putting u's under-estimated items (in teacher order) above
             its over-estimated items (an unordered tail):
             - sum_k [ s_k - log( sum_{j>=k} exp(s_j) + sum_l exp(sbar_l) ) ]
  L = lam * sum_u L_UCD(u) + lam_item * sum_i L_ICD(i)   (L_ICD: the same, users and items swapped)

computed by kdfast.plackett_luce_loss_from_embeddings exactly as RRD does.

How rank_S is computed (rank="catalog") without a U x I sort: kdfast.rank_of_ids counts, for each
teacher item, the unobserved items the student ranks above it (topk_scores' order: ties to the lower
id), in one pass over the items in tiles (no score matrix in memory), clamped at
M = N + ceil(10 eps) (max_rank=M: the C++ kernel stops counting for an item once M items are above
it, and skips the items below all the unsettled ones). The clamp changes no probability (with
rank_T < N, a rank >= M makes (rank_S - rank_T) / eps >= 10 whether clamped or not, and tanh(x) is
exactly 1.0 in float32 for x >= 9.1; p is computed in float32), and keeps rank_S what the earlier
top-M lookup gave.
over="student" takes the student's own top-N list from kdfast.topk_scores (k = N) and uses the same
clamp on the teacher's side: the teacher list is kept to length N + ceil(10 eps) at build, so no
teacher scores are recomputed per epoch.

Sources and deviations (the paper body could not be consulted; the authors' code was,
github.com/dudwns511/DCD_CIKM21, run_dcd.py):
- The authors' code ranks the student WITHIN the teacher's top list (rank="list" here) and draws
  both the under- and the over-estimated items from the teacher's top list; docs/METHODS.md asks
  for the student's rank among all unobserved items, so the default is rank="catalog",
  over="teacher". over="student" is the reading "the student's own top-N items that the teacher
  ranks lower" (needs rank="catalog").
- The authors write tanh(max(ep * d, 0)); eps here is 1 / ep. Their ep, sample count and loss
  weights are command-line values whose defaults are not in the published code. Defaults here:
  eps = 10 (ep = 0.1, RD's mu, whose dynamic weight tanh(mu (rhat - r)) DCD's weighting mirrors),
  K = 30, lam = 1e-3 (RRD's weight for the same sum-reduced listwise loss), lam_item = 5e-4
  (IR-RRD's item-side weight; the DCD code base is DE-RRD/IR-RRD's).
- The authors use N = 500 (their teacher list length) and draw new samples every batch, refreshing
  the ranks every 3 epochs; here N defaults to 100, samples are drawn once per epoch (the kdfast
  convention, as RRD) and the ranks are recomputed every `rank_every` epochs (default 1; 3 is the
  authors' schedule).
- Cost: rank="catalog" runs kdfast.rank_of_ids over the whole U x I (and I x U) score matrix at
  every rank refresh (over="student": kdfast.topk_scores with k = N too), which dominates an epoch
  (results/README.md gives the measured cost); rank="list" only scores the N listed items, and
  rank_every=3 refreshes a third as often.
"""

from __future__ import annotations

import math

import torch

from .._core import checks
from .._core.csr import as_csr, select_rows, transpose_csr
from ..ops.rank_of_ids import BACKENDS as _RANK_OPS
from ..ops.rank_of_ids import rank_of_ids
from ..ops.topk import topk_scores
from .base import (
    BACKEND,
    KDMethod,
    check_teacher,
    checked_options,
    choice,
    optional,
    row_scores,
    sample_rows_loss,
    teacher_top,
    unique_ids,
)

RANK_BACKENDS = ("auto",) + tuple(_RANK_OPS)

#: tanh(x) == 1.0 in float32 for x >= 9.1; ranks beyond N + SATURATE * eps need not be known exactly
SATURATE = 10.0


def _depth(n: int, eps: float, n_ids: int) -> int:
    """How deep a ranking must be known so that clamped ranks give exact probabilities."""
    return min(n + int(math.ceil(SATURATE * eps)), n_ids)


def _positions(lists: torch.Tensor, queries: torch.Tensor, n_ids: int) -> torch.Tensor:
    """Per row r, the position of each id queries[r, j] in lists[r] (ids, -1 padding), or
    lists.shape[1] when it is absent (or the query is -1). Vectorised: one sort of the row-offset
    keys + searchsorted."""
    R, M = lists.shape
    rows = torch.arange(R, device=lists.device)[:, None]
    valid = lists >= 0
    keys = (rows * n_ids + lists)[valid]
    pos = torch.arange(M, device=lists.device).expand(R, M)[valid]
    out = torch.full(queries.shape, M, dtype=torch.int64, device=lists.device)
    if keys.numel() == 0:
        return out
    keys, order = torch.sort(keys)
    pos = pos[order]
    q = rows * n_ids + queries
    at = torch.searchsorted(keys, q).clamp_max(keys.numel() - 1)
    found = (keys[at] == q) & (queries >= 0)
    return torch.where(found, pos[at], out)


def sample_without_replacement(p: torch.Tensor, k: int, generator=None) -> torch.Tensor:
    """min(k, n) distinct column indices per row of p [R, n] (p >= 0), drawn without replacement
    with probabilities proportional to p: the successive-draw law of torch.multinomial(p, k,
    replacement=False).

    Method: Gumbel-top-k - the k largest log p + Gumbel(0, 1) noise (noise drawn in float64 on the
    generator's device); entries with p == 0 get -inf and are never drawn. Where a row has fewer
    than k positive entries, the drawn ones come first (in draw order) and the rest is -1. Returns
    int64 [R, k'].
    """
    R, n = p.shape
    k = min(k, n)
    dev = p.device if generator is None else torch.device(generator.device)
    u = torch.rand((R, n), generator=generator, dtype=torch.float64, device=dev).to(p.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    pd = p.to(torch.float64)
    keys = torch.where(
        pd > 0, torch.log(pd.clamp_min(1e-300)) + gumbel, torch.full_like(gumbel, -math.inf)
    )
    val, idx = torch.topk(keys, k, dim=1)
    return torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))


def _take(cand: torch.Tensor, pos: torch.Tensor, ordered: bool) -> torch.Tensor:
    """Ids cand[r, pos[r, j]] (-1 where pos is -1); ordered: positions sorted ascending first,
    padding last."""
    n = cand.shape[1]
    if ordered:
        pos = torch.sort(torch.where(pos < 0, torch.full_like(pos, n), pos), dim=1).values
        pos = torch.where(pos >= n, torch.full_like(pos, -1), pos)
    ids = torch.gather(cand, 1, pos.clamp_min(0))
    return torch.where(pos < 0, torch.full_like(ids, -1), ids)


def _rank_backend(backend: str) -> str:
    """kdfast.rank_of_ids's backend for the method's `backend` option: a backend it lacks (numba)
    ranks with "auto"."""
    return backend if backend in RANK_BACKENDS else "auto"


def _tanh_weight(diff: torch.Tensor, eps: float) -> torch.Tensor:
    """tanh(max(diff / eps, 0)) in float32 (exactly 1.0 once diff / eps >= 9.1)."""
    return torch.tanh(torch.clamp(diff.to(torch.float32) / eps, min=0.0))


class _DCDSide:
    """One side (users -> items, or items -> users) of DCD: the teacher lists and the per-epoch
    samples.

    teacher [R, D] ids, the teacher's top-D (D = N, or N + ceil(10 eps) for over="student"), -1
    padding after column N; excl: the rows' training CSR; n_ids: number of ids ranked (items, or
    users). After resample(): rank_s [R, N] (the student's rank of the N teacher items, clamped at
    `depth` = min(N + ceil(10 eps), n_ids) for rank="catalog"), p_under [R, N], over_cand [R, N] and
    p_over [R, N], under [R, K] and over_ids [R, K] (sampled ids, -1 padding; under in teacher
    order).
    """

    def __init__(self, teacher, excl, n_ids, n, k, eps, rank, over):
        self.teacher, self.excl, self.n_ids = teacher, excl, n_ids
        self.n, self.k, self.eps, self.rank, self.over = n, k, eps, rank, over
        self.depth = _depth(n, eps, n_ids)  # the student's ranks are known exactly below this
        self.rank_s = self.p_under = self.over_cand = self.p_over = self.under = self.over_ids = (
            None
        )

    #: rows of the tables: all of them (1), or one rank's of `world` (keep_rows)
    world = 1

    def keep_rows(self, rows, world):
        """Keep only the given rows (one rank's of `world`: rows[j] = j * world + rank); resample
        then takes that rank's rows of q_emb and fills row r // world of the samples."""
        self.teacher = self.teacher.index_select(0, rows)
        self.excl = select_rows(self.excl[0], self.excl[1], rows)
        self.world = world
        self.rank_s = self.p_under = self.over_cand = self.p_over = self.under = self.over_ids = (
            None
        )

    def resample(self, q_emb, k_emb, generator, backend, rerank=True):
        """New samples; rerank=True first recomputes the ranks and probabilities from the given
        tables."""
        if rerank or self.p_under is None:
            self._rerank(q_emb, k_emb, backend)
        cand = self.teacher[:, : self.n]
        self.under = _take(
            cand, sample_without_replacement(self.p_under, self.k, generator), ordered=True
        )
        self.over_ids = _take(
            self.over_cand,
            sample_without_replacement(self.p_over, self.k, generator),
            ordered=False,
        )

    def _rerank(self, q_emb, k_emb, backend):
        cand = self.teacher[:, : self.n]
        rank_t = torch.arange(self.n, device=cand.device).expand_as(cand)
        if self.rank == "list":
            scores = row_scores(q_emb, k_emb, cand)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices
            rank_s = torch.empty_like(order).scatter_(1, order, rank_t.contiguous())
            student_top = None
        else:
            # the student's rank of each teacher item among the row's unobserved ids, clamped at
            # depth (padding ids -1 -> depth, as an id absent from a top-depth list)
            full = rank_of_ids(
                q_emb,
                k_emb,
                cand,
                exclude=self.excl,
                max_rank=self.depth,
                backend=_rank_backend(backend),
            )
            rank_s = torch.where(cand >= 0, full, self.depth)
            student_top = None
            if self.over == "student":
                _, student_top = topk_scores(
                    q_emb, k_emb, self.n, exclude=self.excl, backend=backend
                )
        self.rank_s = rank_s
        self.p_under = _tanh_weight(rank_s - rank_t, self.eps)
        if self.over == "teacher":
            self.over_cand, self.p_over = cand, _tanh_weight(rank_t - rank_s, self.eps)
        else:
            # the student's own top-N against the teacher's rank of them (clamped at the list depth)
            own = student_top
            t_rank = _positions(self.teacher, own, self.n_ids)
            self.over_cand = own
            self.p_over = torch.where(
                own >= 0,
                _tanh_weight(t_rank - rank_t, self.eps),
                torch.zeros(own.shape, device=own.device),
            )

    def loss(self, q_emb, k_emb, rows):
        return sample_rows_loss(q_emb, k_emb, self.under, self.over_ids, rows, self.world)


class DCD(KDMethod):
    """Dual Correction strategy for ranking Distillation (user side, plus the item side by default).

    Options and defaults (see the module docstring for the formulas and where each default comes
    from):
      N=100        teacher list length (candidates of both samples on the teacher side);
      K=30         under-estimated and over-estimated items drawn per user (each);
      eps=10.0     p = tanh(max(d / eps, 0)) (the authors' ep = 1 / eps);
      lam=1e-3     weight of the user side (sum over the batch's unique users);
      item_side=True, N_I=None (-> N), K_I=None (-> K), lam_item=5e-4: the item side (each item's
                   teacher top-N_I users; the batch's unique positive items), as the paper's L_ICD;
      rank="catalog" ("list": the authors' within-teacher-list rank), over="teacher" ("student":
                   the student's own top-N, needs rank="catalog");
      rank_every=1 recompute the student's ranks every that many epochs (the authors: 3); the
                   samples are drawn anew every epoch from the latest probabilities;
      backend="auto" for kdfast.topk_scores and the listwise loss.
    start_epoch must run before forward (the samples need the student's ranks).
    forward returns lam * sum_u L_UCD(u) + lam_item * sum_i L_ICD(i).
    """

    name = "dcd"
    option_rules = {
        "N": checks.positive_int,
        "K": checks.positive_int,
        "eps": checks.finite_positive,
        "lam": checks.positive_number,
        "item_side": checks.boolean,
        "N_I": optional(checks.positive_int),
        "K_I": optional(checks.positive_int),
        "lam_item": checks.positive_number,
        "rank": choice("catalog", "list"),
        "over": choice("teacher", "student"),
        "rank_every": checks.positive_int,
        "backend": BACKEND,
    }

    def __init__(
        self, user_side, item_side, n_users, n_items, lam, lam_item, rank_every, backend, generator
    ):
        super().__init__()
        self.user_side, self.item_side = user_side, item_side
        self.n_users, self.n_items = n_users, n_items
        self.lam, self.lam_item, self.rank_every = lam, lam_item, rank_every
        self.backend, self.generator = backend, generator

    @classmethod
    def check_relations(cls, options, label):
        if options["over"] == "student" and options["rank"] != "catalog":
            raise ValueError(
                f"{label}: over='student' needs rank='catalog' (the student's own top-N list)"
            )

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
        N=100,
        K=30,
        eps=10.0,
        lam=1e-3,
        item_side=True,
        N_I=None,
        K_I=None,
        lam_item=5e-4,
        rank="catalog",
        over="teacher",
        rank_every=1,
        backend="auto",
    ):
        n_users, n_items = check_teacher(teacher_user, teacher_item, "dcd")
        N_I = N if N_I is None else N_I
        K_I = K if K_I is None else K_I
        if N > n_items or (item_side and N_I > n_users):
            raise ValueError(
                f"N ({N}) must be <= the number of items ({n_items}) and N_I ({N_I}) <= "
                f"the number of users ({n_users})"
            )
        excl = as_csr(train, "train", n_users, n_items, device=teacher_user.device, validate=True)

        def side(q, k, excl_, n_ids, n, k_, what):
            depth = _depth(n, eps, n_ids) if over == "student" else n
            top = teacher_top(q, k, n, excl_, backend, depth=depth, what=what)
            return _DCDSide(top, excl_, n_ids, n, k_, eps, rank, over)

        user = side(teacher_user, teacher_item, excl, n_items, N, K, "N")
        item = None
        if item_side:
            excl_t = transpose_csr(excl, n_items, n_users)
            item = side(teacher_item, teacher_user, excl_t, n_users, N_I, K_I, "N_I")
        return cls(user, item, n_users, n_items, lam, lam_item, rank_every, backend, generator)

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        self.check_student(student_user, student_item)
        rerank = epoch % self.rank_every == 0
        with torch.no_grad():
            su, si = student_user.detach(), student_item.detach()
            own = su if self.user_shard is None else su.index_select(0, self.own_users(su.device))
            self.user_side.resample(own, si, self.generator, self.backend, rerank)
            if self.item_side is not None:
                self.item_side.resample(si, su, self.generator, self.backend, rerank)

    def shard_users(self, rank, world, all_sum=None):
        """Each rank ranks and samples its own users (see KDMethod.shard_users); the item side's
        per-epoch work (every item's ranks) still runs whole on every rank."""
        self._begin_shard(rank, world)
        self.user_side.keep_rows(self.own_users(self.user_side.teacher.device), world)
        return True

    def forward(self, student_user, student_item, users, pos, neg):
        self.check_batch(student_user, student_item, users, pos, neg)
        if self.user_side.under is None:
            raise RuntimeError(
                "DCD.start_epoch must run before forward (the samples need the student's ranks)"
            )
        ub = unique_ids(users, self.n_users)
        self.local_rows(ub)  # a sharded method holds its own users' samples only
        loss = self.lam * self.user_side.loss(student_user, student_item, ub)
        if self.item_side is not None:
            items = unique_ids(pos, self.n_items)
            loss = loss + self.lam_item * self.item_side.loss(student_item, student_user, items)
        return loss
