"""HetComp (Kang et al., WWW'23): distilling an ensemble of heterogeneous teachers through their
training trajectories; docs/METHODS.md section 7.

The knowledge: each teacher x brings checkpoints v = 0 .. V_x - 1 along its training (the last one
is the final model). Per user u and teacher x one checkpoint v[x, u] is selected (0 at the start).
The ensemble's target list for u is
    pi_t(u) = the top K items by  sum_x  imp_{x, v[x,u]}(u, i),   imp(u, i) = exp(-r / T_imp)
over the positions r = 0 .. K-1 of i in that checkpoint's top-K list of unobserved items (0
elsewhere; ties to the lower item id), and pi_o(u) = the user's observed (training) items in the
final checkpoints' ensemble order, the first P of them (fixed during training).

Phase 1 (while the selections still move), the set-level loss with the catalog tail (weight lam1)
    E_u = sum of exp(S_uj) over unobserved items j not in pi_t(u),   S = clamp(<e_u, e_j>, -c, c),
    L1 = - sum_u sum_{i in pi_o U pi_t} [ S_ui - log(exp(S_ui) + E_u) ]
phase 2 (once every teacher's selections reach the final checkpoint), listwise with constant tails
(weight lam2)
    L2 = ListMLE_{C50}(S[pi_o]) + 0.5 (ListMLE_{C50}(S[pi_t[:50]]) + ListMLE_{C10}(S[pi_t[:10]]))
with C_n = sum of exp(S) over the unobserved items outside pi_t[:n]. Both are computed without the
B x I score matrix: the catalog tails come from kdfast.full_catalog_set_loss /
full_catalog_log_tail (fused GEMM + masked exp-sum, backward recomputes the tiles), and
log C10 = logaddexp(log C50, logsumexp S[pi_t[10:50]]).

Dynamic knowledge construction (DKC): after every `period`-th completed epoch from `start` on, the
student's top-50 unobserved items per user are compared with checkpoint lists:
D(v) = 1 - NDCG(student top-50 vs the checkpoint's top-50), with gain 2^{exp(-p/10)} - 1 at the
student's 0-based position p. The first call only records last = D(v + 1). Later calls, with
th = alpha * decay^(epoch // period): for every (x, u) not at its final checkpoint, if
last / D(v+1) > th or last / D(v+1) < 1, v advances by one and last = D(min(v + 2, final)) (as in
the authors' code); pi_t is rebuilt after each call. Phase 2 starts once, for every teacher, the
mean selected index rounded to two decimals equals its final index (the authors' test).

Deviations from the authors' code, all documented here:
- Log space: every loss term is a log-sum-exp, so the authors' clamp of each denominator at 1e-5
  before the log (which only matters when a denominator underflows in their raw-exp form) is not
  applied.
- `max_users`: the authors use every unique user of each 1024-interaction batch (a user's loss then
  enters once per batch the user appears in, many times per epoch). max_users=M takes at most M of
  them per step (drawn with the method's generator), which bounds the per-step catalog GEMM; None
  (the default) keeps the authors' choice.
- DKC timing: kdfast runs it after 10, 20, ... completed epochs (start=10, period=10); the
  authors' loop runs it one epoch later, after 11, 21, ... (dkc_delay=1 reproduces it; the
  threshold's epoch // period is the same either way).
- DKC distances: the authors round each user's NDCG to 4 decimals before comparing the ratios;
  kdfast compares the exact values (ndcg_decimals=4 reproduces theirs).
- The importance vectors: exp(-rank/10) over each checkpoint's top-K (docs/METHODS.md marks this
  reconstruction [paper?]); the authors load precomputed importance matrices.
- pi_o: per final checkpoint, each observed item's 0-based rank among the user's observed items by
  the teacher's score, importance exp(-rank / T_imp), summed over teachers (the authors load a
  precomputed order).

Training setting: the authors train the HetComp student with Adam (lr 1e-3) and weight decay 1e-5,
not the 1e-3 of the other methods' BPR setting (`kdfast distill --weight-decay 1e-5`): with the KD
loss alone, a 1e-3 L2 term on every embedding outweighs the loss's gradient late in training.

Teachers are given as embedding tables (score = dot product, as for every kdfast model); what
HetComp keeps of each checkpoint is `checkpoint_knowledge`: its top-K list per user and its scores
of the training pairs. The trainer minimises the HetComp loss alone (uses_base_loss False), as the
authors do; base_loss=True adds the BPR loss.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from .._core import checks
from .._core.csr import as_csr, row_ids, select_rows
from .._core.files import atomic_write
from .._core.numerics import gather_rows
from ..ops.full_catalog import full_catalog_log_tail, full_catalog_set_loss, gathered_scores
from ..ops.plackett_luce import plackett_luce_loss
from ..ops.topk import topk_scores
from .base import BACKEND, KDMethod, check_teacher, checked_options, optional, unique_ids

TRAJECTORY_FORMAT = "kdfast-trajectories-1"


def train_fingerprint(train, n_users: int, n_items: int) -> str:
    """A short hash of a training CSR (its canonical row/item pairs), stored with trajectories so
    that a trajectory is never used with another split."""
    indptr, indices = as_csr(train, "train", n_users, n_items, device="cpu", canonical=True)
    h = hashlib.sha256()
    h.update(f"{n_users}x{n_items}:".encode())
    h.update(indptr.numpy().tobytes())
    h.update(indices.numpy().tobytes())
    return h.hexdigest()[:16]


def save_trajectories(
    path, teachers, *, train, n_users: int, n_items: int, meta: dict | None = None
) -> None:
    """Save teachers' checkpoints for HetComp.

    teachers: a list, one entry per teacher:
    {"name": str, "checkpoints": [(user [U, d], item [I, d]), ...]} (checkpoints in training order,
    the last one final; d may differ between teachers), optionally with "epochs" (the epoch of each
    checkpoint) and any other JSON-able entries. A teacher without embedding tables (a scorer such
    as NeuMF) gives "knowledge" instead of "checkpoints": [(top [U, K'], obs [nnz]), ...], each
    checkpoint's checkpoint_knowledge (scorer_knowledge computes it); HetComp then needs K <= K'.
    The file records the training CSR's fingerprint; load_trajectories(..., train=...) refuses
    another split.
    """
    blob = {
        "format": TRAJECTORY_FORMAT,
        "train_fingerprint": train_fingerprint(train, n_users, n_items),
        "n_users": n_users,
        "n_items": n_items,
        "meta": dict(meta or {}),
        "teachers": [],
    }
    for t in _check_teachers(teachers, n_users, n_items):
        entry = {k: v for k, v in t.items() if k not in ("checkpoints", "knowledge")}
        if "knowledge" in t:
            entry["top"] = torch.stack([top.detach().cpu() for top, _ in t["knowledge"]])
            entry["obs"] = torch.stack([obs.detach().float().cpu() for _, obs in t["knowledge"]])
        else:
            entry["user"] = torch.stack([u.detach().float().cpu() for u, _ in t["checkpoints"]])
            entry["item"] = torch.stack([i.detach().float().cpu() for _, i in t["checkpoints"]])
        blob["teachers"].append(entry)
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def load_trajectories(path, *, train=None, n_users: int | None = None, n_items: int | None = None):
    """Teachers saved by save_trajectories: a list of {"name", "checkpoints": [(user, item), ...],
    ...}. With train (and n_users, n_items), a file made on another split raises ValueError."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != TRAJECTORY_FORMAT:
        raise ValueError(f"{path} is not a kdfast trajectory file")
    if train is not None:
        if (n_users, n_items) != (blob["n_users"], blob["n_items"]):
            raise ValueError(
                f"trajectory file {path} is for {blob['n_users']} users x {blob['n_items']} items, "
                f"this run has {n_users} x {n_items}"
            )
        fp = train_fingerprint(train, n_users, n_items)
        if fp != blob["train_fingerprint"]:
            raise ValueError(
                f"trajectory file {path} was made on another training split "
                f"(fingerprint {blob['train_fingerprint']}, this run {fp})"
            )
    out = []
    for t in blob["teachers"]:
        entry = {k: v for k, v in t.items() if k not in ("user", "item", "top", "obs")}
        if "top" in t:
            entry["knowledge"] = list(zip(t["top"].unbind(0), t["obs"].unbind(0)))
        else:
            entry["checkpoints"] = list(zip(t["user"].unbind(0), t["item"].unbind(0)))
        out.append(entry)
    return out


def _check_teachers(teachers, n_users, n_items):
    if not isinstance(teachers, (list, tuple)) or not teachers:
        raise ValueError("trajectories must be a non-empty list of teachers")
    for x, t in enumerate(teachers):
        if isinstance(t, dict) and "knowledge" in t and "checkpoints" not in t:
            _check_knowledge(t["knowledge"], x, n_users, n_items)
            continue
        if not isinstance(t, dict) or "checkpoints" not in t or not t["checkpoints"]:
            raise ValueError(
                f"trajectories[{x}] must be a dict with a non-empty 'checkpoints' list (or, for a "
                "teacher without tables, 'knowledge')"
            )
        for v, ck in enumerate(t["checkpoints"]):
            if not isinstance(ck, (tuple, list)) or len(ck) != 2:
                raise ValueError(
                    f"trajectories[{x}]['checkpoints'][{v}] must be a (user, item) pair of tables"
                )
            u, i = ck
            checks.floating(u, f"trajectories[{x}] checkpoint {v} user table", ndim=2)
            checks.floating(i, f"trajectories[{x}] checkpoint {v} item table", ndim=2)
            if u.shape[0] != n_users or i.shape[0] != n_items or u.shape[1] != i.shape[1]:
                raise ValueError(
                    f"trajectories[{x}] checkpoint {v}: tables {tuple(u.shape)} and "
                    f"{tuple(i.shape)} do not match {n_users} users x {n_items} items with one "
                    "dimension"
                )
    return teachers


def _check_knowledge(knowledge, x, n_users, n_items):
    if not isinstance(knowledge, (list, tuple)) or not knowledge:
        raise ValueError(f"trajectories[{x}]['knowledge'] must be a non-empty list")
    for v, ck in enumerate(knowledge):
        where = f"trajectories[{x}]['knowledge'][{v}]"
        if not isinstance(ck, (tuple, list)) or len(ck) != 2:
            raise ValueError(f"{where} must be a (top [U, K], obs [nnz]) pair")
        top, obs = ck
        if not isinstance(top, torch.Tensor) or top.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{where}: top must be an int64 tensor of item ids")
        if top.ndim != 2 or top.shape[0] != n_users:
            raise ValueError(f"{where}: top must be [{n_users}, K], got {tuple(top.shape)}")
        if top.numel() and (int(top.max()) >= n_items or int(top.min()) < -1):
            raise ValueError(f"{where}: top holds ids outside -1 .. {n_items - 1}")
        checks.floating(obs, f"{where} obs", ndim=1)


def scorer_knowledge(score_pairs, n_users: int, n_items: int, excl, K: int, *, batch: int = 64):
    """checkpoint_knowledge of a teacher that only scores pairs (score_pairs(users [n], items [m])
    -> [n, m], e.g. NeuMF): its top-K unobserved items per user by kdfast.topk_from_scorer, and its
    scores of the training pairs in the canonical CSR order (each row's items ascending, as
    HetComp.build orders them), `batch` users at a time."""
    from ..ops.topk.scorer import topk_from_scorer

    excl = as_csr(excl, "train", n_users, n_items, device="cpu", canonical=True)
    with torch.no_grad():
        _, top = topk_from_scorer(score_pairs, n_users, n_items, K, exclude=excl)
        obs = torch.empty(excl[1].numel(), dtype=torch.float32)
        indptr, items = excl
        for u0 in range(0, n_users, batch):
            u1 = min(u0 + batch, n_users)
            lo, hi = int(indptr[u0]), int(indptr[u1])
            if hi == lo:
                continue
            ids, where = torch.unique(items[lo:hi], return_inverse=True)
            s = score_pairs(torch.arange(u0, u1), ids).float().cpu()
            rows = row_ids(indptr[u0 : u1 + 1] - lo)
            obs[lo:hi] = s[rows, where]
    return top, obs


def _trajectories(v, name):
    """The trajectories option: None, a file path (str or Path), a list of file paths (their
    teachers pooled) or a list of teachers (checked against the data in build)."""
    if v is not None and not isinstance(v, (str, Path, list, tuple)):
        raise TypeError(
            f"{name} must be None, a file path or a list of teachers, got {type(v).__name__}"
        )
    return v


def checkpoint_knowledge(user_emb, item_emb, excl, K: int, backend="auto"):
    """One checkpoint's knowledge: its top-K unobserved items per user [U, K] (teacher order, -1
    where a user has fewer than K unobserved items) and its scores of the training pairs in CSR
    order [nnz]."""
    with torch.no_grad():
        _, top = topk_scores(user_emb, item_emb, K, exclude=excl, backend=backend)
        rows = row_ids(excl[0])
        obs = (user_emb[rows] * item_emb[excl[1]]).sum(1, dtype=torch.float32)
    return top, obs


def ensemble_top(tops, K: int, n_items: int, temperature: float):
    """The ensemble list: tops is a list of [U, K_x] id lists (-1 padding); each contributes
    exp(-r / temperature) at its 0-based position r; returns the top K ids per user by the summed
    importance (ties to the lower id; -1 where fewer than K distinct ids exist)."""
    ids = torch.cat(tops, 1)
    w = torch.cat(
        [
            torch.exp(
                -torch.arange(t.shape[1], dtype=torch.float32, device=t.device) / temperature
            ).expand(t.shape[0], -1)
            for t in tops
        ],
        1,
    )
    w = torch.where(ids >= 0, w, torch.zeros_like(w))
    key = torch.where(ids >= 0, ids, torch.full_like(ids, n_items))  # padding sorts last
    sid, order = torch.sort(key, 1)
    sw = torch.gather(w, 1, order)
    new = torch.ones_like(sid, dtype=torch.bool)
    new[:, 1:] = sid[:, 1:] != sid[:, :-1]
    # group index of each entry, ascending id order
    group = torch.cumsum(new.to(torch.int64), 1) - 1
    total = torch.zeros_like(sw).scatter_add_(1, group, sw)
    # the id of each group (n_items: unused)
    gid = torch.full_like(sid, n_items).scatter_(1, group, sid)
    total = torch.where(gid < n_items, total, torch.full_like(total, -1.0))
    # descending by importance, stable so that equal sums keep ascending ids
    order = torch.sort(total, dim=1, descending=True, stable=True).indices[:, :K]
    out = torch.gather(gid, 1, order)
    out = torch.where(torch.gather(total, 1, order) >= 0, out, torch.full_like(out, -1))
    if out.shape[1] < K:
        out = torch.cat([out, out.new_full((out.shape[0], K - out.shape[1]), -1)], 1)
    return out


def observed_order(excl, obs_scores, n_first: int, temperature: float):
    """pi_o: each user's training items ordered by the summed importance exp(-rank / temperature) of
    their rank among the user's training items under each teacher's scores (obs_scores: a list of
    [nnz] score vectors in CSR order); the first n_first per user, -1 padding. Ties to the lower
    item id."""
    indptr, items = excl
    n_rows = indptr.numel() - 1
    counts = indptr[1:] - indptr[:-1]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    rows = row_ids(indptr)
    col = torch.arange(items.numel(), device=items.device) - indptr[rows]
    # the rows' ids side by side (-1 padding), and the permutation that sorts each row by id
    # (padding last): a stable descending sort after it breaks score ties towards the lower id
    idd = torch.full((n_rows, width), -1, dtype=torch.int64, device=items.device)
    idd[rows, col] = items
    by_id = torch.sort(
        torch.where(idd >= 0, idd, torch.full_like(idd, 1 << 62)), dim=1, stable=True
    ).indices

    def descending(values):
        o2 = torch.sort(torch.gather(values, 1, by_id), dim=1, descending=True, stable=True).indices
        return torch.gather(by_id, 1, o2)

    total = torch.zeros(n_rows, width, dtype=torch.float32, device=items.device)
    positions = torch.arange(width, device=items.device).expand(n_rows, -1)
    for s in obs_scores:
        dense = torch.full((n_rows, width), -math.inf, dtype=torch.float32, device=items.device)
        dense[rows, col] = s.float()
        # rank among the row's items
        rank = torch.empty_like(by_id).scatter_(1, descending(dense), positions)
        total += torch.exp(-rank.float() / temperature)
    total = torch.where(idd >= 0, total, torch.full_like(total, -1.0))
    out = torch.gather(idd, 1, descending(total)[:, :n_first])
    if out.shape[1] < n_first:
        out = torch.cat([out, out.new_full((n_rows, n_first - out.shape[1]), -1)], 1)
    return out


def top_ndcg(student_top, teacher_top, k: int = 50, temperature: float = 10.0):
    """Per row, NDCG of the student's list against membership in the teacher's first k ids, with
    gain 2^{exp(-p / temperature)} - 1 at the student's 0-based position p (HetComp's DKC distance
    is 1 - this)."""
    s = student_top[:, :k]
    t = teacher_top[:, :k]
    t_sorted = torch.sort(torch.where(t >= 0, t, torch.full_like(t, -2)), 1).values
    pos = torch.searchsorted(t_sorted, s.contiguous()).clamp_max(t_sorted.shape[1] - 1)
    hit = (torch.gather(t_sorted, 1, pos) == s) & (s >= 0)
    p = torch.arange(s.shape[1], dtype=torch.float64, device=s.device)
    disc = (torch.pow(2.0, torch.exp(-p / temperature)) - 1.0) / torch.log2(p + 2.0)
    return (hit.to(torch.float64) * disc).sum(1) / disc.sum()


class HetComp(KDMethod):
    """HetComp: the ensemble's easy-to-hard ranking knowledge (the math: the module docstring).

    Options (docs/METHODS.md section 7 defaults): trajectories (a list of teachers as for
    save_trajectories, the path of a file it wrote, or a list of such paths whose teachers are
    pooled; None: the teacher given to build, as one teacher with one checkpoint), K=100 (list
    length of pi_t and of each checkpoint's list), n_observed=10 (P, the length of pi_o), T_imp=10.0
    (importance temperature), period=10 and start=10 (DKC every `period` completed epochs from epoch
    `start`), alpha=1.05, decay=0.995 (the DKC threshold), lam1=0.01 (phase 1), lam2=0.005 (phase
    2), clamp=40.0, dcg_k=50 (the DKC lists' length), dkc_delay=0 (1: DKC one epoch later, as the
    authors' loop), ndcg_decimals=None (4: round each user's DKC NDCG as the authors do),
    max_users=None (at most this many of a batch's users per step; None: all), base_loss=False
    (True: the trainer adds the BPR loss), backend="auto" (top-K and the catalog tails).
    """

    name = "hetcomp"
    option_rules = {
        "trajectories": _trajectories,
        "K": checks.positive_int,
        "n_observed": checks.positive_int,
        "T_imp": checks.positive_number,
        "period": checks.positive_int,
        "start": checks.nonneg_int,
        "alpha": checks.positive_number,
        "decay": checks.positive_number,
        "lam1": checks.positive_number,
        "lam2": checks.positive_number,
        "clamp": checks.positive_number,
        "dcg_k": checks.positive_int,
        "dkc_delay": checks.nonneg_int,
        "ndcg_decimals": optional(checks.nonneg_int),
        "max_users": optional(checks.positive_int),
        "base_loss": checks.boolean,
        "backend": BACKEND,
    }

    def __init__(self, knowledge, excl, pi_o, n_users, n_items, opts, generator):
        super().__init__()
        # per teacher: [V, U, K] top lists
        self.knowledge = [torch.stack(lists) for lists in knowledge]
        self.excl, self.pi_o = excl, pi_o
        self.n_users, self.n_items = n_users, n_items
        self.opts, self.generator = opts, generator
        self.uses_base_loss = opts["base_loss"]
        device = excl[0].device
        self.selected = torch.zeros(len(knowledge), n_users, dtype=torch.int64, device=device)
        self.final = torch.tensor([len(k) - 1 for k in knowledge], dtype=torch.int64, device=device)
        self.last_dist = None
        self.phase = 1
        self.dkc_calls = 0
        self.names = [f"teacher{x}" for x in range(len(knowledge))]
        self._update_phase()
        self.pi_t = self._ensemble()

    @classmethod
    def check_relations(cls, options, label):
        if options["K"] < 50:
            raise ValueError(
                f"{label}: K must be >= 50 (phase 2 uses the first 50 items of pi_t), "
                f"got {options['K']}"
            )
        if options["dcg_k"] > options["K"]:
            raise ValueError(f"{label}: dcg_k ({options['dcg_k']}) must be <= K ({options['K']})")

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
        trajectories=None,
        K=100,
        n_observed=10,
        T_imp=10.0,
        period=10,
        start=10,
        alpha=1.05,
        decay=0.995,
        lam1=0.01,
        lam2=0.005,
        clamp=40.0,
        dcg_k=50,
        dkc_delay=0,
        ndcg_decimals=None,
        max_users=None,
        base_loss=False,
        backend="auto",
    ):
        n_users, n_items = check_teacher(teacher_user, teacher_item, "hetcomp")
        device = teacher_user.device
        opts = {
            "K": K,
            "n_observed": n_observed,
            "T_imp": T_imp,
            "period": period,
            "start": start,
            "alpha": alpha,
            "decay": decay,
            "lam1": lam1,
            "lam2": lam2,
            "clamp": clamp,
            "dcg_k": dcg_k,
            "dkc_delay": dkc_delay,
            "ndcg_decimals": ndcg_decimals,
            "max_users": max_users,
            "base_loss": base_loss,
            "backend": backend,
        }
        excl = as_csr(
            train, "train", n_users, n_items, device=device, canonical=True, validate=True
        )
        if trajectories is None:
            teachers = [
                {"name": "teacher", "checkpoints": [(teacher_user.detach(), teacher_item.detach())]}
            ]
        elif isinstance(trajectories, (str, Path)) or (
            isinstance(trajectories, (list, tuple))
            and trajectories
            and all(isinstance(f, (str, Path)) for f in trajectories)
        ):  # one file, or several whose teachers are pooled in order
            files = [trajectories] if isinstance(trajectories, (str, Path)) else trajectories
            train_cpu = (excl[0].cpu(), excl[1].cpu())
            teachers = [
                t
                for f in files
                for t in load_trajectories(f, train=train_cpu, n_users=n_users, n_items=n_items)
            ]
        else:
            teachers = _check_teachers(trajectories, n_users, n_items)
        knowledge, obs_scores = [], []
        for x, t in enumerate(teachers):
            lists = []
            given = t.get("knowledge")
            for v, ck in enumerate(given if given is not None else t["checkpoints"]):
                if given is not None:  # precomputed lists (a teacher without tables)
                    top, obs = ck
                    if top.shape[1] < K:
                        raise ValueError(
                            f"trajectories: teacher {t.get('name', x)} has top-{top.shape[1]} "
                            f"lists, fewer than K = {K}"
                        )
                    top, obs = top[:, :K].to(device, torch.int64), obs.to(device)
                else:
                    u, i = ck
                    top, obs = checkpoint_knowledge(u.to(device), i.to(device), excl, K, backend)
                lists.append(top)
                if v == len(lists) - 1 and v == len(given or t["checkpoints"]) - 1:
                    obs_scores.append(obs)
            knowledge.append(lists)
        pi_o = observed_order(excl, obs_scores, n_observed, opts["T_imp"])
        method = cls(knowledge, excl, pi_o, n_users, n_items, opts, generator)
        method.names = [str(t.get("name", f"teacher{x}")) for x, t in enumerate(teachers)]
        return method

    # -- the ensemble and its dynamic construction -------------------------------------------------
    def _selected_lists(self, offset: int = 0):
        """Per teacher, [U, K] top lists of each user's checkpoint min(v + offset, final)."""
        out = []
        for x, stack in enumerate(self.knowledge):
            v = torch.clamp(self.selected[x] + offset, max=int(self.final[x]))
            out.append(stack[v, torch.arange(stack.shape[1], device=v.device)])
        return out

    def _ensemble(self):
        return ensemble_top(
            self._selected_lists(), self.opts["K"], self.n_items, self.opts["T_imp"]
        )

    def _distance(self, student_top, offset):
        """[X, U] float64: 1 - NDCG(student top vs the checkpoint min(v + offset, final))."""
        k, decimals = self.opts["dcg_k"], self.opts["ndcg_decimals"]

        def ndcg(t):
            x = top_ndcg(student_top, t, k)
            return x if decimals is None else torch.round(x, decimals=decimals)

        return torch.stack([1.0 - ndcg(t) for t in self._selected_lists(offset)])

    def _update_phase(self):
        sums = self.selected.to(torch.float64).sum(1)
        if self.user_shard is not None:  # the mean over every user, not this rank's
            sums = self._all_sum(sums)
        self.mean_selected = means = sums / self.n_users
        done = bool((torch.round(means * 100) / 100 == self.final.to(torch.float64)).all())
        self.phase = 2 if done else 1

    def dkc(self, epoch: int, student_user, student_item) -> None:
        """One dynamic-knowledge-construction step (see the module docstring) with the student's
        tables."""
        with torch.no_grad():
            if self.user_shard is not None:  # this rank's users
                student_user = student_user.index_select(0, self.own_users(student_user.device))
            _, student_top = topk_scores(
                student_user,
                student_item,
                self.opts["dcg_k"],
                exclude=self.excl,
                backend=self.opts["backend"],
            )
            if self.last_dist is None:
                self.last_dist = self._distance(student_top, 1)
            else:
                th = self.opts["alpha"] * self.opts["decay"] ** (epoch // self.opts["period"])
                nxt = self._distance(student_top, 1)
                # inf / nan where the next distance is 0, as in the authors' code
                ratio = self.last_dist / nxt
                move = (self.selected < self.final[:, None]) & ((ratio > th) | (ratio < 1))
                after = self._distance(student_top, 2)
                self.selected = torch.where(move, self.selected + 1, self.selected)
                self.last_dist = torch.where(move, after, self.last_dist)
            self.dkc_calls += 1
            self._update_phase()
            self.pi_t = self._ensemble()

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        self.check_student(student_user, student_item)
        p, s = self.opts["period"], self.opts["start"]
        done = epoch - self.opts["dkc_delay"]  # completed epochs, as the schedule counts them
        if self.phase == 1 and done > 0 and done >= s and done % p == 0:
            self.dkc(done, student_user, student_item)

    def shard_users(self, rank, world, all_sum=None):
        """Each rank keeps its own users' knowledge, lists and selected checkpoints, and the
        dynamic knowledge construction ranks and moves them only (see KDMethod.shard_users); the
        phase, decided by the mean selected checkpoint over every user, takes the ranks' sums
        through all_sum (required when world > 1)."""
        if world > 1 and all_sum is None:
            raise ValueError("all_sum: HetComp needs a sum over the ranks to shard its users")
        self._begin_shard(rank, world)
        own = self.own_users(self.selected.device)
        self._all_sum = all_sum if all_sum is not None else (lambda t: t)
        self.knowledge = [k.index_select(1, own) for k in self.knowledge]
        self.excl = select_rows(self.excl[0], self.excl[1], own)
        self.pi_o = self.pi_o.index_select(0, own)
        self.selected = self.selected.index_select(1, own)
        if self.last_dist is not None:
            self.last_dist = self.last_dist.index_select(1, own)
        self.pi_t = self.pi_t.index_select(0, own)
        return True

    def status(self) -> str:
        # sharded: the means over every user of the last construction step (this rank's own
        # selected rows are only its users')
        sel = self.selected.to(torch.float64).mean(1)
        means = (self.mean_selected if self.user_shard is not None else sel).tolist()
        names = ", ".join(
            f"{n} {m:.2f}/{int(f)}" for n, m, f in zip(self.names, means, self.final.tolist())
        )
        return f"phase {self.phase}, DKC calls {self.dkc_calls}, mean checkpoint {names}"

    # -- the loss
    # ------------------------------------------------------------------------------------
    def loss_for_users(self, student_user, student_item, ub):
        """The weighted HetComp loss (current phase) of the users ub (int64 ids)."""
        o = self.opts
        rows = self.local_rows(ub)  # ub itself unless sharded
        excl = select_rows(self.excl[0], self.excl[1], rows)
        ue = gather_rows(student_user, ub)
        pi_o, pi_t = self.pi_o[rows], self.pi_t[rows]
        if self.phase == 1:
            pos = torch.cat([pi_o, pi_t], 1)
            return o["lam1"] * full_catalog_set_loss(
                ue,
                student_item,
                pos,
                exclude=excl,
                clamp=o["clamp"],
                reduction="sum",
                backend=o["backend"],
            )
        top50 = pi_t[:, :50]
        lt50 = full_catalog_log_tail(
            ue, student_item, top50, exclude=excl, clamp=o["clamp"], backend=o["backend"]
        )
        s_top, _ = gathered_scores(ue, student_item, top50, o["clamp"])
        s_obs, _ = gathered_scores(ue, student_item, pi_o, o["clamp"])
        lt10 = torch.logaddexp(lt50, torch.logsumexp(s_top[:, 10:50], 1))
        pl = plackett_luce_loss
        loss = pl(s_obs, None, log_tail=lt50, reduction="sum") + 0.5 * (
            pl(s_top, None, log_tail=lt50, reduction="sum")
            + pl(s_top[:, :10], None, log_tail=lt10, reduction="sum")
        )
        return o["lam2"] * loss

    def forward(self, student_user, student_item, users, pos, neg):
        self.check_batch(student_user, student_item, users, pos, neg)
        ub = unique_ids(users, self.n_users)
        m = self.opts["max_users"]
        if m is not None and ub.numel() > m:
            g = self.generator
            perm = torch.randperm(
                ub.numel(), generator=g, device=g.device if g is not None else "cpu"
            )
            ub = ub[perm[:m].to(ub.device)].sort().values
        return self.loss_for_users(student_user, student_item, ub)
