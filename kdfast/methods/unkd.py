"""UnKD - Unbiased Knowledge Distillation for recommendation (Chen et al., WSDM'23); docs/METHODS.md
section 8.

Popularity groups (build): items are sorted by their number of training interactions c_i
(descending, ties to the lower id) and cut into G groups of (about) equal interaction mass: with
C_before(i) the total count of the items before i in that order and C the total, item i is in group
floor(G * C_before(i) / C) (at most G - 1). A group can be empty (one item holding more than 1/G of
the mass); items without training interactions fall in the last group.

Teacher knowledge (build): per user u and group g, the teacher's ranking of the group's items the
user has not interacted with, top n (kdfast.topk_scores with the keys restricted to the group's
items and the user's training items of the group excluded); L_ug = its length (min(n, unobserved
items of the group)).

Samples (every epoch, start_epoch): per user, S pairs in all, S_g = S // G (+1 for the first S % G
groups) in group g. A pair is two positions r1, r2 drawn independently from p(r) ~ exp(-(r + 1) / T)
on 0..L_ug - 1, redrawn while r1 == r2, then ordered so that r1 < r2 (the authors draw whole vectors
of pairs with torch.multinomial(replacement=True) and redraw the vector while a pair is tied: the
same law). Each draw is the inverse CDF of the truncated geometric law (float64). A group with
L_ug < 2 gives no pair. The pair's items are i = top_ug[r1] (teacher-preferred) and j = top_ug[r2].

Loss, for the batch's unique users U_b (those with at least one pair), B = the batch's number of
interactions (len(users)):
  l_u = mean over u's pairs of -log( sigmoid(s_ui - s_uj) + 1e-10 )
  L   = lam * B * mean_{u in U_b} l_u      reduction="batch" (default)
  L   = lam * mean_{u in U_b} l_u          reduction="mean"  (the authors' code, literally)
  L   = lam * sum_{u in U_b} sum_pairs     reduction="sum"
The authors' KD loss is MEAN-reduced (sample.py, UnKD.sample_diff: torch.mean(..., dim=-1), then
torch.mean over the batch), unlike every other kdfast method, and so is their BPR loss (model.py,
BPRMF.create_bpr_loss: torch.mean): their kd_weight 1.0 weighs a mean KD loss against a MEAN BPR
loss. kdfast's BPR loss is a SUM over the batch's B interactions (docs/METHODS.md section 1), so the
authors' balance is B times their KD mean: reduction="batch", the default. The literal "mean" with
lam = 1.0 leaves the KD term B times weaker than in the authors' runs (B = 1024 with kdfast's
default batch size). The default keeps the authors' balance; on CiteULike-t a smaller lam, chosen
on validation, works better (results/README.md, section "Peers").

Sources (the authors' code, github.com/chengang95/UnKD: sample.py class UnKD, dataloader.py
splitGroup, parse.py) and deviations:
- defaults from the code: S = 30 (sample_num), T = 20 (exp(-(r+1)/20)), n = 1000 (negItems[:1000]),
  lam = 1.0 (kd_weight); G = 4 as docs/METHODS.md (the code's split_group default is 2).
- the authors split each user's S pairs over the groups in proportion to a group weight raised to a
  power `lamda` whose default 0 makes the split even; with their rounding, S = 30 and G = 4 gives 8
  pairs per group (32); here the split is exactly S in total (8, 8, 7, 7).
- the authors' group cut is greedy (a group closes when its running count passes C / G, restarting
  the count) and leaves items without training interactions out of every group; here the cut is by
  the cumulative count as above and those items join the last group.
- the authors' batch mean runs over the batch's interactions (a user counted once per interaction);
  here over the batch's unique users, as kdfast's other methods.
Cost: build runs G teacher top-n calls (one per group, vectorised over users); the top lists hold
U * G * n int32 ids (4 U G n bytes).
"""

from __future__ import annotations

import math

import torch

from .._core import checks
from .._core.csr import as_csr, map_ids
from .._core.numerics import gather_rows
from ..ops.topk import topk_scores
from .base import BACKEND, KDMethod, check_teacher, checked_options, choice, unique_ids

_MAX_ROUNDS = 1000


def popularity_groups(train_items: torch.Tensor, n_items: int, n_groups: int) -> torch.Tensor:
    """Group id (0 = most popular) of every item: equal interaction mass per group (see the module
    docstring).

    train_items: int64 ids of all training interactions. Returns int64 [n_items] in [0, n_groups).
    """
    counts = torch.bincount(train_items, minlength=n_items)
    order = torch.sort(-counts, stable=True).indices  # descending count, ties to the lower id
    c = counts[order]
    before = torch.cumsum(c, 0) - c
    total = max(int(counts.sum()), 1)
    g_sorted = torch.div(before * n_groups, total, rounding_mode="floor").clamp_max(n_groups - 1)
    groups = torch.empty_like(g_sorted)
    groups[order] = g_sorted
    return groups


def truncated_geometric(lengths: torch.Tensor, q: float, size: int, generator=None) -> torch.Tensor:
    """Positions r in 0..L-1 with p(r) ~ q^r per row (L = lengths[row] >= 1), `size` iid draws per
    row.

    Inverse CDF in float64: r = floor(log(1 - u (1 - q^L)) / log q), u ~ U[0, 1), clamped to L - 1.
    Rows with L = 0 get 0 (callers mask them). Returns int64 [rows, size].
    """
    dev = lengths.device if generator is None else torch.device(generator.device)
    u = torch.rand(
        (lengths.numel(), size), generator=generator, dtype=torch.float64, device=dev
    ).to(lengths.device)
    L = lengths.to(torch.float64)[:, None]
    r = torch.floor(torch.log1p(-u * (1.0 - q**L)) / math.log(q))
    return torch.minimum(r, (L - 1).clamp_min(0)).to(torch.int64)


class UnKD(KDMethod):
    """Unbiased Knowledge Distillation (popularity-group-wise pairwise ranking distillation).

    Options (defaults; see the module docstring for the formulas and sources):
      G=4 popularity groups of equal interaction mass; n=1000 teacher positions kept per user and
      group; S=30 pairs per user per epoch in all (split evenly over the groups); T=20.0 (p(r) ~
      exp(-(r+1)/T)); lam=1.0; reduction="batch" (the authors' mean over pairs and users times the
      batch's number of interactions: the authors' KD-to-BPR balance under kdfast's sum-reduced
      BPR), "mean" (the authors' literal mean, about 1000 times weaker here) or "sum";
      backend="auto" for kdfast.topk_scores.
    Attributes after build: groups [I] (group of each item), top [U, G, n] (teacher's within-group
    order, int32 ids, -1 padding), lengths [U, G]; after every start_epoch (and at build):
    pos_items, neg_items [U, S] (int64, -1 where the user's group has no pair), pair_group [S] and
    pair_rank (r1, r2) [U, S] each.
    """

    name = "unkd"
    option_rules = {
        "G": checks.positive_int,
        "n": checks.positive_int,
        "S": checks.positive_int,
        "T": checks.finite_positive,
        "lam": checks.positive_number,
        "reduction": choice("mean", "batch", "sum"),
        "backend": BACKEND,
    }

    def __init__(
        self, groups, top, lengths, per_group, n_users, n_items, T, lam, reduction, generator
    ):
        super().__init__()
        self.groups, self.top, self.lengths, self.per_group = groups, top, lengths, per_group
        self.n_users, self.n_items, self.T, self.lam, self.reduction = (
            n_users,
            n_items,
            T,
            lam,
            reduction,
        )
        self.generator = generator
        self.pair_group = torch.repeat_interleave(
            torch.arange(len(per_group), device=top.device),
            torch.tensor(per_group, device=top.device),
        )
        self.pos_items = self.neg_items = self.pair_rank = None

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
        G=4,
        n=1000,
        S=30,
        T=20.0,
        lam=1.0,
        reduction="batch",
        backend="auto",
    ):
        n_users, n_items = check_teacher(teacher_user, teacher_item, "unkd")
        if n_items >= 2**31:
            raise ValueError(f"UnKD stores item ids as int32; got {n_items} items")
        device = teacher_user.device
        indptr, indices = as_csr(train, "train", n_users, n_items, device=device, validate=True)
        groups = popularity_groups(indices, n_items, G)
        top = torch.full((n_users, G, n), -1, dtype=torch.int32, device=device)
        tu, ti = teacher_user.detach(), teacher_item.detach()
        with torch.no_grad():
            for g in range(G):  # one teacher top-n per group (G calls), vectorised over users
                members = torch.nonzero(groups == g).flatten()
                if members.numel() == 0:
                    continue
                local = torch.full((n_items,), -1, dtype=torch.int64, device=device)
                local[members] = torch.arange(members.numel(), device=device)
                k = min(n, members.numel())
                _, idx = topk_scores(
                    tu, ti[members], k, exclude=map_ids(indptr, indices, local), backend=backend
                )
                top[:, g, :k] = torch.where(idx >= 0, members[idx.clamp_min(0)], idx).to(
                    torch.int32
                )
        lengths = (top >= 0).sum(2)
        per_group = [S // G + (1 if g < S % G else 0) for g in range(G)]
        method = cls(
            groups, top, lengths, per_group, n_users, n_items, T, lam, reduction, generator
        )
        method._resample()
        return method

    def _resample(self):
        U = self.top.shape[0]
        # [U * S]: the length of each pair's group list
        L = self.lengths[:, self.pair_group].reshape(-1)
        q = math.exp(-1.0 / self.T)
        r1 = truncated_geometric(L, q, 1, self.generator).flatten()
        r2 = truncated_geometric(L, q, 1, self.generator).flatten()
        ok = L >= 2
        todo = torch.nonzero(ok & (r1 == r2)).flatten()
        for _ in range(_MAX_ROUNDS):  # redraw tied pairs (each round about 2.5% of them for T = 20)
            if todo.numel() == 0:
                break
            r1[todo] = truncated_geometric(L[todo], q, 1, self.generator).flatten()
            r2[todo] = truncated_geometric(L[todo], q, 1, self.generator).flatten()
            todo = todo[r1[todo] == r2[todo]]
        else:
            raise RuntimeError("UnKD pair sampling did not finish")
        lo, hi = torch.minimum(r1, r2), torch.maximum(r1, r2)
        S = self.pair_group.numel()
        lo, hi, ok = lo.view(U, S), hi.view(U, S), ok.view(U, S)
        g = self.pair_group.expand(U, S)
        urow = torch.arange(U, device=lo.device)[:, None].expand(U, S)
        pos = self.top[urow, g, lo].to(torch.int64)
        neg = self.top[urow, g, hi].to(torch.int64)
        self.pos_items = torch.where(ok, pos, torch.full_like(pos, -1))
        self.neg_items = torch.where(ok, neg, torch.full_like(neg, -1))
        self.pair_rank = (
            torch.where(ok, lo, torch.full_like(lo, -1)),
            torch.where(ok, hi, torch.full_like(hi, -1)),
        )

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        self._resample()

    def shard_users(self, rank, world, all_sum=None):
        """Each rank samples its own users' pairs (see KDMethod.shard_users)."""
        self._begin_shard(rank, world)
        own = self.own_users(self.top.device)
        self.top, self.lengths = self.top.index_select(0, own), self.lengths.index_select(0, own)
        self._resample()
        return True

    def forward(self, student_user, student_item, users, pos, neg):
        self.check_batch(student_user, student_item, users, pos, neg)
        ub = unique_ids(users, self.n_users)
        rows = self.local_rows(ub)
        i, j = self.pos_items[rows], self.neg_items[rows]
        valid = i >= 0
        eu = gather_rows(student_user, ub)[:, None, :]
        ei, ej = (
            gather_rows(student_item, i.clamp_min(0)),
            gather_rows(student_item, j.clamp_min(0)),
        )
        diff = (eu * (ei - ej)).sum(2)
        per_pair = -torch.log(torch.sigmoid(diff) + 1e-10)
        per_pair = torch.where(valid, per_pair, torch.zeros_like(per_pair))
        if self.reduction == "sum":
            return self.lam * per_pair.sum()
        n_pairs = valid.sum(1)
        has = n_pairs > 0
        per_user = per_pair.sum(1) / n_pairs.clamp_min(1)
        loss = per_user.sum() / has.sum().clamp_min(1)
        if self.reduction == "batch":
            loss = loss * users.numel()
        return self.lam * loss
