"""The interface between the trainer and every KD method, and what the methods share.

A method is a torch.nn.Module (its own trainable parts - DE's experts, HTD's group assigners - are
its parameters; the trainer optimises them with the student and drops them after training):

    method = Cls.build(teacher_user, teacher_item, train, student_dim, generator=g, **options)
    method.start_epoch(epoch, max_epoch, student_user, student_item)   # resampling, annealing
    loss = method(student_user, student_item, users, pos, neg)          # weighted KD loss (scalar)

teacher_user [U, d_t], teacher_item [I, d_t]: the frozen teacher's embeddings (BPR-MF scores are dot
products); train: the training interactions as an int64 CSR pair (indptr [U+1], item ids), users ->
items; student_user [U, d_s], student_item [I, d_s]: the student's embedding tables (weights of its
nn.Embedding, with gradient); users, pos, neg: int64 [B] - the batch of BPR triples. The returned
loss is already multiplied by the method's lambda and sum-reduced like the base BPR loss
(docs/METHODS.md section 1).

Options: a method's options are the keyword arguments of its build (after `generator`), with their
defaults there. The class declares the rule of each option once in `option_rules` (name -> check
from kdfast._core.checks, or `optional` / `choice` of them) and the rules that tie options together
in `check_relations`; `check_options` applies both, and `@checked_options` runs it on every build
call, so the registry (kdfast.methods.registry.validate_options) and build check with the same
rules. Rules that need the data (N larger than the candidates of some user) stay in build.

Shared here: the one teacher-table check (`check_teacher`), the frozen-teacher holder
(`FrozenTeacher`), the one batch check (`KDMethod.check_batch`), the teacher's top-N lists
(`teacher_top`), `unique_ids`, `row_scores`, `batch_entities`, `entity_weighted`, `sampler_backend`.
"""

from __future__ import annotations

import functools
import inspect
import numbers

import torch

from .._core import backend as _backend
from .._core import checks
from .._core.numerics import gather_rows
from ..ops.plackett_luce import plackett_luce_loss_from_embeddings as pl_loss
from ..ops.topk import topk_scores


# ------------------------------------------------------------------------------------ option rules
def optional(check):
    """The rule `check`, or None (an option whose None default means "derived from another one")."""

    def rule(v, name):
        return None if v is None else check(v, name)

    return rule


def choice(*allowed):
    """The rule: one of the given names."""

    def rule(v, name):
        return checks.one_of(v, name, allowed)

    return rule


#: the rule of every method's `backend` option
BACKEND = choice(*_backend.NAMES)

# the type a default asks of a value (bool before int: a bool is an int to Python)
_KINDS = (
    (bool, lambda v: isinstance(v, bool), "True or False"),
    (int, lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an int"),
    (float, lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
    (str, lambda v: isinstance(v, str), "a string"),
)


def like_default(v, name, default):
    """v must have the type of the option's default: bool for bool, int for int, a number for float,
    a string for str; a None default (or one of another type) leaves the value to the option's rule.
    """
    for kind, ok, what in _KINDS:
        if isinstance(default, kind):
            if not ok(v):
                raise TypeError(f"{name} must be {what} (default {default!r}), got {v!r}")
            return v
    return v


def checked_options(build):
    """Decorator of a KDMethod's build (under @classmethod): the call's options go through
    cls.check_options before the body runs, which gets the checked values."""
    sig = inspect.signature(build)

    @functools.wraps(build)
    def wrapper(cls, *args, **kwargs):
        bound = sig.bind(cls, *args, **kwargs)
        bound.apply_defaults()
        names = cls.option_defaults()
        given = {k: v for k, v in bound.arguments.items() if k in names}
        bound.arguments.update(cls.check_options(given))
        return build(*bound.args, **bound.kwargs)

    return wrapper


# ----------------------------------------------------------------------------------- the interface
class KDMethod(torch.nn.Module):
    """Base class: subclasses implement build, forward and (if they need it) start_epoch."""

    name = "kd"
    #: False: the trainer minimises the method's loss alone, without the BPR base loss (HetComp's
    #: authors train the student with the KD loss only)
    uses_base_loss = True
    #: option name -> rule(value, name) returning the checked value (kdfast._core.checks and
    #: optional / choice); an option without a rule is only checked against its default's type
    option_rules: dict = {}
    #: the sizes every batch is checked against (set by build); student_dim None: any width
    n_users: int
    n_items: int
    student_dim: int | None = None

    @classmethod
    def build(cls, teacher_user, teacher_item, train, student_dim, *, generator=None, **options):
        raise NotImplementedError

    def start_epoch(self, epoch: int, max_epoch: int, student_user, student_item) -> None:
        """Per-epoch work (sampling, temperature annealing); default: nothing."""

    def status(self) -> str | None:
        """A short line on the method's state for the training log and history (e.g. HetComp's
        phase); default: None."""
        return None

    # -- data-parallel training: each rank's share of the per-epoch work ------------------------
    #: (rank, world) once shard_users has restricted the per-user per-epoch work to one rank's users
    user_shard: tuple[int, int] | None = None

    def shard_users(self, rank: int, world: int, all_sum=None) -> bool:
        """Keep only the users u with u % world == rank in the per-user per-epoch work (sampling,
        the student's ranks) and in the tables it fills, whose row of user u is then u // world.
        The trainer calls it on every rank of a data-parallel run, whose rank `rank` then passes
        forward only batches of those users (forward raises ValueError on any other user).

        Returns True when the method shards; the default returns False, and the whole per-epoch
        work then runs on every rank alike (a method without per-user per-epoch work, or one whose
        per-epoch step needs every user: see each method's docstring). A sharded method draws its
        samples from a generator of its own per rank (seeded from one draw of the method's
        generator), so the ranks' samples are independent and a seeded run repeats exactly; they
        are not the one-process samples. all_sum: a function that sums a tensor over the ranks
        (the trainer passes an all_reduce over its group), for a method whose per-epoch step needs
        a total over every user (HetComp)."""
        return False

    def _begin_shard(self, rank: int, world: int) -> None:
        """The common part of shard_users: the checks, user_shard, and the rank's own generator
        (one draw of the method's generator, the same on every rank, plus the rank)."""
        world = checks.positive_int(world, "world")
        rank = checks.nonneg_int(rank, "rank")
        if rank >= world:
            raise ValueError(f"rank must be in [0, world), got rank {rank} with world {world}")
        if self.user_shard is not None:
            raise RuntimeError(f"{self.name}: shard_users was already called")
        self.user_shard = (rank, world)
        g = getattr(self, "generator", None)
        if g is not None:
            base = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
            self.generator = torch.Generator(g.device).manual_seed(base + rank)

    def own_users(self, device=None) -> torch.Tensor:
        """The users whose per-epoch work this rank does (all of them when not sharded)."""
        rank, world = self.user_shard or (0, 1)
        return torch.arange(rank, self.n_users, world, device=device)

    def local_rows(self, ub: torch.Tensor) -> torch.Tensor:
        """The rows of users `ub` in the tables the per-epoch work fills: ub itself, or ub // world
        when sharded (ValueError on a user of another rank)."""
        if self.user_shard is None:
            return ub
        rank, world = self.user_shard
        if ub.numel() and not bool((ub % world == rank).all()):
            bad = int(ub[ub % world != rank][0])
            raise ValueError(
                f"users: user {bad} belongs to another rank; {self.name} on rank {rank} of "
                f"{world} holds the per-epoch samples of the users u with u % {world} == {rank}"
            )
        return torch.div(ub, world, rounding_mode="floor")

    def forward(self, student_user, student_item, users, pos, neg):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- options -----------------------------------------------------------------------------------
    @classmethod
    def option_defaults(cls) -> dict:
        """{option: default}: build's keyword-only arguments but `generator`."""
        params = inspect.signature(cls.build).parameters.values()
        return {
            p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "generator"
        }

    @classmethod
    def check_options(cls, options: dict, label: str | None = None) -> dict:
        """The given options checked: names against build's signature, each value against its
        default's type and its rule in option_rules, then check_relations on the options with the
        defaults filled in. Returns the given options with their checked values; TypeError or
        ValueError names `label` (default: the method's name) and the option."""
        label = label or cls.name
        defaults = cls.option_defaults()
        params = inspect.signature(cls.build).parameters.values()
        open_ended = any(p.kind is p.VAR_KEYWORD for p in params)  # build(..., **options)
        unknown = sorted(k for k in options if k not in defaults)
        if unknown and not open_ended:
            valid = ", ".join(sorted(defaults))
            raise ValueError(f"{label}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
        out = {}
        for key, value in options.items():
            name = f"{label}: {key}"
            value = like_default(value, name, defaults.get(key))
            rule = cls.option_rules.get(key)
            out[key] = value if rule is None else rule(value, name)
        cls.check_relations({**defaults, **out}, label)
        return out

    @classmethod
    def check_relations(cls, options: dict, label: str) -> None:
        """Rules that tie options together (e.g. N >= K), on checked options with the defaults
        filled in; ValueError naming `label`. Default: none."""

    # -- the batch ---------------------------------------------------------------------------------
    def check_student(self, student_user, student_item) -> None:
        """The student tables: floating 2-D, n_users and n_items rows of one width (student_dim
        when set). Methods that use them in start_epoch check them there too."""
        checks.floating(student_user, "student_user", ndim=2)
        checks.floating(student_item, "student_item", ndim=2)
        dim = student_user.shape[1] if self.student_dim is None else self.student_dim
        if student_user.shape != (self.n_users, dim) or student_item.shape != (self.n_items, dim):
            cols = "d" if self.student_dim is None else str(dim)
            raise ValueError(
                f"student tables must be [{self.n_users}, {cols}] and [{self.n_items}, {cols}], "
                f"got {tuple(student_user.shape)} and {tuple(student_item.shape)}"
            )

    def check_batch(self, student_user, student_item, users, pos, neg) -> None:
        """The batch check of every method: the student tables (check_student), users, pos and neg
        integer 1-D of one length, their ids in range."""
        self.check_student(student_user, student_item)
        for name, t in (("users", users), ("pos", pos), ("neg", neg)):
            checks.integer(t, name, ndim=1)
        if not users.shape[0] == pos.shape[0] == neg.shape[0]:
            raise ValueError(
                f"users, pos and neg must have the same length, got {users.shape[0]}, "
                f"{pos.shape[0]}, {neg.shape[0]}"
            )
        if users.numel() == 0:
            return
        # one device round trip when every id is in range; the checks name the culprit otherwise
        ends = torch.stack([users.min(), users.max(), pos.min(), pos.max(), neg.min(), neg.max()])
        lo_u, hi_u, lo_p, hi_p, lo_n, hi_n = ends.tolist()
        if min(lo_u, lo_p, lo_n) < 0 or hi_u >= self.n_users or max(hi_p, hi_n) >= self.n_items:
            checks.index_range(users, "users", self.n_users)
            checks.index_range(pos, "pos", self.n_items)
            checks.index_range(neg, "neg", self.n_items)


# ------------------------------------------------------------------------------------- the teacher
# Methods that need only the teacher's ranking (top lists, with their scores) also take a teacher
# known by its scores alone, as the pair of views scorer_teacher() returns; the others need tables.
SCORER_METHODS = ("rrd", "ir-rrd", "rd", "cd", "dcd")


class TeacherSide:
    """One side ("user" or "item") of a teacher known by its scores only (see scorer_teacher):
    what teacher_top and check_teacher read of a teacher table (its number of rows, its device)."""

    def __init__(self, score_fn, n_users, n_items, side, device, tile_elems):
        self.score_fn, self.n_users, self.n_items = score_fn, n_users, n_items
        self.side, self.device, self.tile_elems = side, device, tile_elems
        self.shape = (n_users if side == "user" else n_items,)

    def detach(self):
        return self

    def pair_scores(self, q_ids, k_ids):
        """[q, n] scores of this side's ids q_ids against the other side's k_ids."""
        if self.side == "user":
            return self.score_fn(q_ids, k_ids)
        return self.score_fn(k_ids, q_ids).T


def scorer_teacher(score_fn, n_users: int, n_items: int, *, device="cpu", tile_elems=1 << 21):
    """(teacher_user, teacher_item) views of a teacher known by its scores only, to pass where a
    method's build takes the two teacher tables: score_fn(user_ids [n], item_ids [m]) -> [n, m]
    (e.g. kdfast.NeuMF's score_pairs). Its rankings come from kdfast.topk_from_scorer (users over
    items, and items over users for the item sides of IR-RRD and DCD). Methods that read the
    teacher's tables (DE, PHR, FTD, HTD, UnKD's groups, HetComp's checkpoints) refuse it by name.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    n_users = checks.positive_int(n_users, "n_users")
    n_items = checks.positive_int(n_items, "n_items")
    device = torch.device(device)
    return tuple(
        TeacherSide(score_fn, n_users, n_items, side, device, tile_elems)
        for side in ("user", "item")
    )


def check_teacher(teacher_user, teacher_item, method: str | None = None) -> tuple[int, int]:
    """The teacher check of every method: floating 2-D tables of one width, or (when `method`, a
    method's name, is among SCORER_METHODS) the two views of one scorer_teacher.

    Returns (n_users, n_items)."""
    if isinstance(teacher_user, TeacherSide) or isinstance(teacher_item, TeacherSide):
        if method not in SCORER_METHODS:
            label = method or "this method"
            raise ValueError(
                f"{label} needs the teacher's embedding tables (teacher_user, teacher_item), but "
                "the teacher is a scorer (kdfast.scorer_teacher): pass tables (e.g. "
                f"kdfast.families.dot_tables(model)) or use one of {', '.join(SCORER_METHODS)}"
            )
        ok = (
            isinstance(teacher_user, TeacherSide)
            and isinstance(teacher_item, TeacherSide)
            and teacher_user.side == "user"
            and teacher_item.side == "item"
            and teacher_user.score_fn is teacher_item.score_fn
        )
        if not ok:
            raise ValueError(
                "teacher_user and teacher_item must be the (user, item) pair that "
                "kdfast.scorer_teacher returns, in that order"
            )
        return teacher_user.n_users, teacher_user.n_items
    checks.floating(teacher_user, "teacher_user", ndim=2)
    checks.floating(teacher_item, "teacher_item", ndim=2)
    checks.same_dim(teacher_user, "teacher_user", teacher_item, "teacher_item")
    return teacher_user.shape[0], teacher_item.shape[0]


class FrozenTeacher(KDMethod):
    """Base of the methods that read the teacher's tables at every step (DE, PHR, FTD, HTD): checks
    them once and keeps them as non-persistent buffers, dropped with the method after training (the
    method never stores the student, so the student alone remains)."""

    def __init__(self, teacher_user, teacher_item, student_dim: int | None = None):
        super().__init__()
        self.n_users, self.n_items = check_teacher(teacher_user, teacher_item, self.name)
        if student_dim is not None:
            self.student_dim = checks.positive_int(student_dim, "student_dim")
        self.register_buffer("teacher_user", teacher_user.detach(), persistent=False)
        self.register_buffer("teacher_item", teacher_item.detach(), persistent=False)


def _chunked_topk(queries, keys, k, exclude, backend):
    """topk_scores over all queries; a long one (kdfast._core.progress) in blocks of queries with a
    progress bar (each row's result is the same either way)."""
    from .._core import progress
    from .._core.csr import select_rows

    n_q = queries.shape[0]
    pairs = n_q * float(keys.shape[0])
    if not progress.enabled(pairs) or n_q < 2:
        return topk_scores(queries, keys, k, exclude=exclude, backend=backend)
    step = max(1, int(n_q * progress.LONG_PAIRS / 4 / pairs))  # blocks of ~2.5e8 pairs
    vals, idx = [], []
    with progress.bar(n_q, "teacher top-N", pairs=pairs, unit="query") as bar:
        for r0 in range(0, n_q, step):
            ex = None
            if exclude is not None:
                rows = torch.arange(r0, min(r0 + step, n_q), device=exclude[0].device)
                ex = select_rows(*exclude, rows)
            v, i = topk_scores(queries[r0 : r0 + step], keys, k, exclude=ex, backend=backend)
            vals.append(v)
            idx.append(i)
            bar.update(v.shape[0])
    return torch.cat(vals), torch.cat(idx)


def teacher_top(
    queries,
    keys,
    n: int,
    exclude,
    backend,
    *,
    depth: int | None = None,
    what="N",
    with_values=False,
):
    """The teacher's top-`depth` (default n) key ids per query, training interactions (`exclude`, a
    CSR pair) excluded, -1 padding (with their scores first when with_values); ValueError naming
    the option `what` when some query has fewer than n candidates. Runs without gradient. queries
    and keys: the teacher's tables (query side first), or the matching views of a scorer_teacher.
    """
    with torch.no_grad():
        if isinstance(queries, TeacherSide):
            from ..ops.topk.scorer import topk_from_scorer

            vals, idx = topk_from_scorer(
                queries.pair_scores,
                queries.shape[0],
                keys.shape[0],
                depth or n,
                exclude=exclude,
                device=queries.device,
                tile_elems=queries.tile_elems,
            )
        else:
            vals, idx = _chunked_topk(queries.detach(), keys.detach(), depth or n, exclude, backend)
    if bool((idx[:, :n] < 0).any()):
        counts = exclude[0][1:] - exclude[0][:-1]
        short = keys.shape[0] - int(counts.max())
        raise ValueError(
            f"{what} = {n} is larger than the number of unobserved candidates of some row "
            f"(as few as {short}); lower {what}"
        )
    return (vals, idx) if with_values else idx


def sampler_backend(backend: str) -> str:
    """The samplers' backend for a method's `backend` option: they have torch and cpp backends; any
    other request samples with "auto"."""
    return backend if backend in ("torch", "cpp") else "auto"


# ---------------------------------------------------------------------------------------- the batch
def sample_rows_loss(q_emb, k_emb, ranked, unranked, rows, world: int = 1):
    """sum over `rows` (ids of the side) of the Plackett-Luce loss of their sample rows: ranked
    [R, K] and unranked [R, L], tables that hold every row (world 1) or one data-parallel rank's
    rows, row r // world for id r (KDMethod.shard_users)."""
    if world == 1:
        return pl_loss(q_emb, k_emb, ranked, unranked, rows=rows, reduction="sum")
    local = torch.div(rows, world, rounding_mode="floor")
    return pl_loss(
        gather_rows(q_emb, rows),
        k_emb,
        ranked.index_select(0, local),
        unranked.index_select(0, local),
        reduction="sum",
    )


def unique_ids(ids, n):
    """The sorted distinct ids of an int64 vector with values in [0, n) (a bincount, not a sort)."""
    return torch.nonzero(torch.bincount(ids, minlength=n)).flatten()


def batch_entities(users, pos, neg):
    """(unique users, unique items of pos and neg) of a batch."""
    return torch.unique(users), torch.unique(torch.cat([pos, neg]))


def entity_weighted(loss_of, users, pos, neg, item_weight: float):
    """sum_{unique users} l + item_weight * (sum_{unique pos} l + sum_{unique neg} l), with
    l = loss_of(side, ids) summed over ids (DE's and PHR's weighting of the batch's entities)."""
    return loss_of("user", torch.unique(users)) + item_weight * (
        loss_of("item", torch.unique(pos)) + loss_of("item", torch.unique(neg))
    )


# rows per block when scoring [rows, m] id lists (bounds the gathered [rows, m, d] tensor)
_BLOCK_ELEMS = 1 << 24


def row_scores(q_emb, k_emb, ids):
    """s[r, j] = <q_emb[r], k_emb[ids[r, j]]> for every row r of ids [R, m] (ids >= 0), blocked over
    rows so that the gathered rows never exceed 2^24 elements. For per-epoch work without gradient
    (RD's rank estimate, DCD's ranks within the teacher list)."""
    rows, m = ids.shape
    step = max(1, _BLOCK_ELEMS // max(1, m * q_emb.shape[1]))
    out = [
        torch.einsum("ud,umd->um", q_emb[lo : lo + step], k_emb[ids[lo : lo + step]])
        for lo in range(0, rows, step)
    ]
    return torch.cat(out) if out else q_emb.new_zeros((0, m))


# the registry, where it always was (kdfast.methods.registry holds it)
from .registry import METHODS, method_class, validate_options  # noqa: E402, F401
