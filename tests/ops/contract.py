"""The contract every op of kdfast.ops keeps, as data: for each public function, how to make inputs,
how to call it, its oracle (the op's reference in float64), its custom ops, and the bad inputs it
must reject. tests/ops/test_contract.py runs every clause on every backend; a new op adds one Spec
here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse
import torch

import kdfast
from kdfast._core.csr import with_ids
from kdfast.ops import full_catalog as fc_op
from kdfast.ops import plackett_luce as pl_op
from kdfast.ops import topk as topk_op
from kdfast.ops import topology as topo_op
from kdfast.ops.full_catalog import reference as fc_ref
from kdfast.ops.plackett_luce import reference as pl_ref
from kdfast.ops.topk import reference as topk_ref
from kdfast.ops.topology import reference as topo_ref

F32, F64 = torch.float32, torch.float64


@dataclass
class Spec:
    """One public function of an op.

    make(dtype, device, gen) -> (args, kwargs): small inputs; the floating args listed in `diff` are
        the differentiable ones (the tests make them leaves that require grad).
    call(args, kwargs, backend) -> tensor or tuple: the public function.
    oracle(args, kwargs) -> the same output from the op's reference, computed in float64.
    ops(args, kwargs, backend) -> [(custom op, its arguments)] for torch.library.opcheck.
    bad: [(name, mutate(args, kwargs) -> (args, kwargs), exception, message fragment)].
    dtypes: backend -> the floating dtypes it takes here (a backend the op lacks: none; the
        contract tests skip it).
    gradcheck: the backends whose float64 path is exact enough for torch.autograd.gradcheck.
    atomic_grads: backends whose gradients use atomics (bitwise reproducible only under
        torch.use_deterministic_algorithms(True)).
    """

    name: str
    make: Callable
    call: Callable
    oracle: Callable
    ops: Callable
    diff: tuple = ()
    bad: list = field(default_factory=list)
    dtypes: dict = field(
        default_factory=lambda: {"torch": (F32, F64), "cpp": (F32, F64), "triton": (F32, F64)}
    )
    gradcheck: tuple = ("torch", "cpp", "triton", "numba")
    atomic_grads: tuple = ()


# the ops that have a numba backend (kdfast/ops/<op>/numba.py)
WITH_NUMBA = {"torch": (F32, F64), "cpp": (F32, F64), "triton": (F32, F64), "numba": (F32, F64)}


def _csr(n_rows, n_cols, gen, per_row=3, device="cpu"):
    """Random exclusion CSR: unsorted ids with repeats (every row but the last has at least one)."""
    counts = torch.randint(1, per_row + 1, (n_rows,), generator=gen)
    counts[-1] = 0
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    ids = torch.randint(0, n_cols, (int(indptr[-1]),), generator=gen)
    return indptr.to(device), ids.to(device)


def _ids(shape, n, gen, device, pad=True):
    ids = torch.randint(0, n, shape, generator=gen)
    if pad and ids.numel() > 2:
        ids.view(-1)[1::5] = -1
    return ids.to(device)


def _excl(change):
    """A bad-input mutation of the exclusion CSR (indptr, indices) -> (indptr', indices')."""

    def mutate(a, kw):
        ip, ix = kw["exclude"]
        return a, _with(kw, exclude=change(ip.clone(), ix.clone()))

    return mutate


def _swap(args, i, value):
    args = list(args)
    args[i] = value
    return tuple(args)


def _with(kwargs, **more):
    return {**kwargs, **more}


# ------------------------------------------------------------------------------------------- topk
def _topk_make(dtype, device, gen):
    # small integers: every dot product is exact, so every backend gives the reference's exact order
    q = torch.randint(-3, 4, (7, 5), generator=gen).to(dtype).to(device)
    keys = torch.randint(-3, 4, (29, 5), generator=gen).to(dtype).to(device)
    return (q, keys, 6), {"exclude": _csr(7, 29, gen, device=device)}


def _topk_oracle(args, kwargs):
    q, keys, k = args
    indptr, indices = kdfast.as_csr(kwargs["exclude"], "exclude", q.shape[0], keys.shape[0])
    return topk_ref.topk_scores(q.double(), keys.double(), k, indptr, indices)


def _topk_ops(args, kwargs, backend):
    q, keys, k = args
    indptr, indices = kwargs["exclude"]
    return [(topk_op._topk_op, (q, keys, k, indptr, indices, backend))]


TOPK = Spec(
    name="topk_scores",
    make=_topk_make,
    call=lambda a, kw, b: kdfast.topk_scores(*a, backend=b, **kw),
    oracle=_topk_oracle,
    ops=_topk_ops,
    dtypes=WITH_NUMBA,
    bad=[
        ("k = 0", lambda a, kw: (_swap(a, 2, 0), kw), ValueError, "k must be >= 1"),
        ("k not an int", lambda a, kw: (_swap(a, 2, 2.5), kw), TypeError, "k must be an int"),
        (
            "queries 1-D",
            lambda a, kw: (_swap(a, 0, a[0][0]), kw),
            ValueError,
            "queries must be 2-D",
        ),
        ("keys 3-D", lambda a, kw: (_swap(a, 1, a[1][None]), kw), ValueError, "keys must be 2-D"),
        (
            "keys integer",
            lambda a, kw: (_swap(a, 1, a[1].long()), kw),
            TypeError,
            "keys must be a floating",
        ),
        ("d differs", lambda a, kw: (_swap(a, 1, a[1][:, :3]), kw), ValueError, "same dimension"),
        ("dtypes differ", lambda a, kw: (_swap(a, 1, a[1].half()), kw), TypeError, "same dtype"),
        (
            "devices differ",
            lambda a, kw: (_swap(a, 1, a[1].to("meta")), kw),
            ValueError,
            "same device",
        ),
        ("exclude rows", _excl(lambda ip, ix: (ip[:-1], ix)), ValueError, "exclude indptr"),
        (
            "exclude decreasing",
            _excl(lambda ip, ix: (torch.cat([ip[:1], ip[2:3], ip[1:2], ip[3:]]), ix)),
            ValueError,
            "non-decreasing",
        ),
        ("exclude start", _excl(lambda ip, ix: (ip + 1, ix)), ValueError, "start at 0"),
        ("exclude end", _excl(lambda ip, ix: (ip, ix[:-1])), ValueError, "does not match"),
        (
            "exclude id too large",
            _excl(lambda ip, ix: (ip, ix + 100)),
            ValueError,
            "exclude indices",
        ),
        (
            "exclude id negative",
            _excl(lambda ip, ix: (ip, ix - 100)),
            ValueError,
            "exclude indices",
        ),
        ("exclude float ids", _excl(lambda ip, ix: (ip, ix.float())), TypeError, "exclude indices"),
        (
            "exclude type",
            lambda a, kw: (a, _with(kw, exclude="items")),
            TypeError,
            "exclude must be",
        ),
        (
            "exclude scipy rows",
            lambda a, kw: (a, _with(kw, exclude=scipy.sparse.csr_matrix(np.ones((2, 29))))),
            ValueError,
            "rows",
        ),
    ],
)


# --------------------------------------------------------------------------------- Plackett-Luce
def _pl_make(dtype, device, gen):
    s = (3 * torch.randn(5, 6, generator=gen, dtype=F64)).to(dtype).to(device)
    s[1, 2] = float("-inf")  # padding inside a row
    s[3] = float("-inf")  # a row with nothing valid
    u = (3 * torch.randn(5, 7, generator=gen, dtype=F64)).to(dtype).to(device)
    u[0, 4] = float("-inf")
    t = torch.randn(5, generator=gen, dtype=F64).to(dtype).to(device)
    return (s, u), {"log_tail": t, "reduction": "none"}


def _pl_oracle(args, kwargs):
    s, u = (x.double() for x in args)
    return pl_ref.plackett_luce_loss(s, u, kwargs["log_tail"].double(), kwargs["reduction"])


def _pl_ops(args, kwargs, backend):
    s, u = args
    t = kwargs["log_tail"]
    without_grad = (s.detach(), None, None, False, backend)
    return [(pl_op._scores_op, (s, u, t, True, backend)), (pl_op._scores_op, without_grad)]


PLACKETT_LUCE = Spec(
    name="plackett_luce_loss",
    make=_pl_make,
    call=lambda a, kw, b: kdfast.plackett_luce_loss(*a, backend=b, **kw),
    oracle=_pl_oracle,
    ops=_pl_ops,
    dtypes=WITH_NUMBA,
    diff=(0, 1),
    bad=[
        ("ranked integer", lambda a, kw: (_swap(a, 0, a[0].long()), kw), TypeError, "ranked"),
        ("ranked a list", lambda a, kw: (_swap(a, 0, [[1.0, 2.0]]), kw), TypeError, "ranked"),
        ("ranked 1-D", lambda a, kw: (_swap(a, 0, a[0][0]), kw), ValueError, "ranked"),
        ("unranked rows", lambda a, kw: (_swap(a, 1, a[1][:2]), kw), ValueError, "unranked"),
        ("unranked integer", lambda a, kw: (_swap(a, 1, a[1].int()), kw), TypeError, "unranked"),
        ("unranked dtype", lambda a, kw: (_swap(a, 1, a[1].half()), kw), TypeError, "unranked"),
        (
            "log_tail rows",
            lambda a, kw: (a, _with(kw, log_tail=kw["log_tail"][:2])),
            ValueError,
            "log_tail",
        ),
        (
            "log_tail 2-D",
            lambda a, kw: (a, _with(kw, log_tail=kw["log_tail"][:, None])),
            ValueError,
            "log_tail",
        ),
        (
            "log_tail integer",
            lambda a, kw: (a, _with(kw, log_tail=kw["log_tail"].long())),
            TypeError,
            "log_tail",
        ),
        ("K = 0 alone", lambda a, kw: ((a[0][:, :0],), {}), ValueError, "K = 0"),
        ("reduction", lambda a, kw: (a, _with(kw, reduction="avg")), ValueError, "reduction"),
    ],
)


def _emb_make(dtype, device, gen):
    q = torch.randn(5, 6, generator=gen, dtype=F64).to(dtype).to(device)
    e = torch.randn(13, 6, generator=gen, dtype=F64).to(dtype).to(device)
    ri = _ids((5, 4), 13, gen, device)
    ri[2, 1] = ri[2, 0] = 7  # repeated ids accumulate
    ui = _ids((5, 9), 13, gen, device)
    t = torch.randn(5, generator=gen, dtype=F64).to(dtype).to(device)
    return (q, e, ri, ui), {"log_tail": t, "reduction": "none"}


def _emb_oracle(args, kwargs):
    q, e, ri, ui = args
    return pl_ref.plackett_luce_loss_from_embeddings(
        q.double(), e.double(), ri, ui, kwargs["log_tail"].double(), kwargs["reduction"]
    )


def _emb_ops(args, kwargs, backend):
    q, e, ri, ui = args
    t = kwargs["log_tail"]
    rows = torch.tensor([3, 0, 3], device=q.device)
    _, d_r, d_u, _, gq = pl_op._emb_op(
        q.detach(), e.detach(), ri, ui, t.detach(), rows, True, backend
    )
    grad = torch.ones(3, dtype=gq.dtype, device=q.device)
    return [
        (pl_op._emb_op, (q, e, ri, ui, t, None, True, backend)),
        (pl_op._emb_op, (q.detach(), e.detach(), ri, ui, t.detach(), rows, False, backend)),
        (pl_op._emb_bwd_op, (grad, q.detach(), e.detach(), ri, ui, rows, d_r, d_u, gq, backend)),
    ]


def _bad_id(i, where, value):
    def mutate(a, kw):
        idx = a[i].clone()
        idx[where] = value
        return _swap(a, i, idx), kw

    return mutate


PLACKETT_LUCE_EMB = Spec(
    name="plackett_luce_loss_from_embeddings",
    make=_emb_make,
    call=lambda a, kw, b: kdfast.plackett_luce_loss_from_embeddings(*a, backend=b, **kw),
    oracle=_emb_oracle,
    ops=_emb_ops,
    dtypes=WITH_NUMBA,
    diff=(0, 1),
    atomic_grads=("triton",),
    bad=[
        ("ranked id too large", _bad_id(2, (1, 0), 13), ValueError, "ranked_idx holds ids outside"),
        (
            "unranked id below -1",
            _bad_id(3, (2, 1), -2),
            ValueError,
            "unranked_idx holds ids outside",
        ),
        (
            "rows out of range",
            lambda a, kw: (a, _with(kw, rows=torch.tensor([0, 5], device=a[0].device))),
            ValueError,
            "rows holds ids outside",
        ),
        (
            "rows float",
            lambda a, kw: (a, _with(kw, rows=torch.tensor([0.0], device=a[0].device))),
            TypeError,
            "rows must be an integer",
        ),
        ("ranked_idx rows", lambda a, kw: (_swap(a, 2, a[2][:2]), kw), ValueError, "ranked_idx"),
        (
            "unranked_idx rows",
            lambda a, kw: (_swap(a, 3, a[3][:2]), kw),
            ValueError,
            "unranked_idx",
        ),
        (
            "ranked_idx float",
            lambda a, kw: (_swap(a, 2, a[2].float()), kw),
            TypeError,
            "ranked_idx",
        ),
        ("query integer", lambda a, kw: (_swap(a, 0, a[0].long()), kw), TypeError, "query_emb"),
        ("dtypes differ", lambda a, kw: (_swap(a, 1, a[1].half()), kw), TypeError, "dtype"),
        ("d differs", lambda a, kw: (_swap(a, 1, a[1][:, :3]), kw), ValueError, "dimension"),
        (
            "log_tail rows",
            lambda a, kw: (a, _with(kw, log_tail=kw["log_tail"][:2])),
            ValueError,
            "log_tail",
        ),
        ("K = 0 alone", lambda a, kw: ((a[0], a[1], a[2][:, :0]), {}), ValueError, "K = 0"),
        ("reduction", lambda a, kw: (a, _with(kw, reduction="max")), ValueError, "reduction"),
    ],
)


# ----------------------------------------------------------------------------------- full catalog
def _fc_make(dtype, device, gen):
    u = torch.randn(4, 5, generator=gen, dtype=F64).to(dtype).to(device)
    v = torch.randn(23, 5, generator=gen, dtype=F64).to(dtype).to(device)
    ranked = _ids((4, 3), 23, gen, device)
    return (u, v, ranked), {
        "exclude": _csr(4, 23, gen, device=device),
        "clamp": 1.5,
        "reduction": "none",
    }


def _fc_oracle(args, kwargs):
    u, v, ranked = args
    indptr, indices = kdfast.as_csr(kwargs["exclude"], "exclude", u.shape[0], v.shape[0])
    u64, v64 = u.double(), v.double()
    ip, ix = with_ids(indptr, indices, ranked, v.shape[0])  # the tail leaves out the ranked ids too
    lt = fc_ref.log_tail(u64, v64, ip, ix, kwargs["clamp"])
    s, _ = fc_op.gathered_scores(u64, v64, ranked, kwargs["clamp"])
    return pl_ref.plackett_luce_loss(s, None, lt, kwargs["reduction"])


def _fc_ops(args, kwargs, backend):
    u, v, ranked = args
    ip, ix = kwargs["exclude"]
    lt = fc_op._log_tail_op(u.detach(), v.detach(), ranked, ip, ix, 1.5, backend)
    grad = torch.ones_like(lt)
    return [
        (fc_op._log_tail_op, (u, v, ranked, ip, ix, 1.5, backend)),
        (fc_op._log_tail_bwd_op, (grad, lt, u.detach(), v.detach(), ranked, ip, ix, 1.5, backend)),
    ]


FULL_CATALOG = Spec(
    name="full_catalog_listwise_loss",
    make=_fc_make,
    call=lambda a, kw, b: kdfast.full_catalog_listwise_loss(*a, backend=b, **kw),
    oracle=_fc_oracle,
    ops=_fc_ops,
    diff=(0, 1),
    bad=[
        ("ranked_idx rows", lambda a, kw: (_swap(a, 2, a[2][:2]), kw), ValueError, "ranked_idx"),
        ("ranked id too large", lambda a, kw: (_swap(a, 2, a[2] + 100), kw), ValueError, "ranked"),
        (
            "ranked_idx float",
            lambda a, kw: (_swap(a, 2, a[2].float()), kw),
            TypeError,
            "ranked_idx",
        ),
        ("d differs", lambda a, kw: (_swap(a, 1, a[1][:, :3]), kw), ValueError, "dimension"),
        ("dtypes differ", lambda a, kw: (_swap(a, 1, a[1].half()), kw), TypeError, "dtype"),
        ("clamp <= 0", lambda a, kw: (a, _with(kw, clamp=-1.0)), ValueError, "clamp"),
        ("no items", lambda a, kw: (_swap(a, 1, a[1][:0]), kw), ValueError, "at least one item"),
        ("reduction", lambda a, kw: (a, _with(kw, reduction="max")), ValueError, "reduction"),
        (
            "exclude rows",
            lambda a, kw: (a, _with(kw, exclude=(kw["exclude"][0][:-1], kw["exclude"][1]))),
            ValueError,
            "exclude",
        ),
        (
            "exclude id",
            lambda a, kw: (a, _with(kw, exclude=(kw["exclude"][0], kw["exclude"][1] + 50))),
            ValueError,
            "exclude",
        ),
    ],
)


# ---------------------------------------------------------------------------------------- topology
def _ftd_make(dtype, device, gen):
    t = torch.randn(9, 6, generator=gen, dtype=F64).to(dtype).to(device)
    s = torch.randn(9, 3, generator=gen, dtype=F64).to(dtype).to(device)
    return (t, s), {}  # (rows of norm 0, where the cosine is not differentiable: test_topology.py)


def _ftd_ops(args, kwargs, backend):
    t, s = args
    without_grad = (t.detach(), s.detach(), False, False, backend)
    return [(topo_op._ftd_op, (t, s, True, True, backend)), (topo_op._ftd_op, without_grad)]


_PAIR_BAD = [
    ("rows differ", lambda a, kw: (_swap(a, 1, a[1][:4]), kw), ValueError, "rows"),
    ("teacher 1-D", lambda a, kw: (_swap(a, 0, a[0][0]), kw), ValueError, "teacher must be 2-D"),
    (
        "student integer",
        lambda a, kw: (_swap(a, 1, a[1].long()), kw),
        TypeError,
        "student must be a floating",
    ),
]

# the Triton topology kernels compute in float32 whatever the input: no float64 gradcheck there
TOPOLOGY = Spec(
    name="topology_loss",
    make=_ftd_make,
    call=lambda a, kw, b: kdfast.topology_loss(*a, backend=b, **kw),
    oracle=lambda a, kw: topo_ref.topology_loss(a[0].double(), a[1].double()),
    ops=_ftd_ops,
    diff=(0, 1),
    gradcheck=("torch", "cpp"),
    dtypes={"torch": (F32, F64), "cpp": (F32, F64), "triton": (F32,)},
    bad=_PAIR_BAD
    + [("reduction", lambda a, kw: (a, _with(kw, reduction="none")), ValueError, "reduction")],
)


def _htd_make(dtype, device, gen):
    (t, s), _ = _ftd_make(dtype, device, gen)
    groups = torch.randint(0, 3, (9,), generator=gen).to(device)
    return (t, s, groups, 3), {"teacher_cos_filter": True}


def _htd_ops(args, kwargs, backend):
    t, s, groups, n = args
    return [(topo_op._grouped_op, (t, s, groups, n, True, True, backend)),
            (topo_op._grouped_op, (t, s.detach(), groups, n, False, False, backend))]  # fmt: skip


GROUPED_TOPOLOGY = Spec(
    name="grouped_topology_loss",
    make=_htd_make,
    call=lambda a, kw, b: kdfast.grouped_topology_loss(*a, backend=b, **kw),
    oracle=lambda a, kw: topo_ref.grouped_topology_loss(
        a[0].double(), a[1].double(), a[2], kw["teacher_cos_filter"]
    )[0],
    ops=_htd_ops,
    diff=(1,),
    gradcheck=("torch", "cpp"),
    dtypes={"torch": (F32, F64), "cpp": (F32, F64), "triton": (F32,)},
    bad=_PAIR_BAD
    + [
        (
            "group id too large",
            lambda a, kw: (_swap(a, 2, a[2] + 3), kw),
            ValueError,
            "groups holds ids outside",
        ),
        (
            "group id negative",
            lambda a, kw: (_swap(a, 2, a[2] - 3), kw),
            ValueError,
            "groups holds ids outside",
        ),
        ("n_groups = 0", lambda a, kw: (_swap(a, 3, 0), kw), ValueError, "n_groups must be >= 1"),
        (
            "groups length",
            lambda a, kw: (_swap(a, 2, a[2][:4]), kw),
            ValueError,
            "one entry per row",
        ),
        (
            "groups float",
            lambda a, kw: (_swap(a, 2, a[2].float()), kw),
            TypeError,
            "groups must be an integer",
        ),
        (
            "filter not a bool",
            lambda a, kw: (a, _with(kw, teacher_cos_filter=1)),
            TypeError,
            "teacher_cos_filter",
        ),
    ],
)

SPECS = [TOPK, PLACKETT_LUCE, PLACKETT_LUCE_EMB, FULL_CATALOG, TOPOLOGY, GROUPED_TOPOLOGY]


# ------------------------------------------------------------------------------------ rank of ids
# Ranks are integers: call and oracle return (ranks as float64, ranks), so that the tuple clauses of
# test_contract compare the ranks exactly.
def _rank_make(dtype, device, gen):
    # small integers: every dot product is exact (many ties), so every backend must give the
    # reference's ranks exactly
    q = torch.randint(-2, 3, (6, 5), generator=gen).to(dtype).to(device)
    keys = torch.randint(-2, 3, (31, 5), generator=gen).to(dtype).to(device)
    ip, ix = _csr(6, 31, gen, device=device)
    ids = _ids((6, 7), 31, gen, device)
    ids[0, 0] = ix[0]  # an excluded id: its rank among the others
    return (q, keys, ids), {"exclude": (ip, ix)}


def _rank_pair(ranks):
    return ranks.double(), ranks


def _rank_oracle(args, kwargs):
    from kdfast.ops.rank_of_ids import reference as rank_ref

    q, keys, ids = args
    indptr, indices = kdfast.as_csr(kwargs["exclude"], "exclude", q.shape[0], keys.shape[0])
    return _rank_pair(rank_ref.rank_of_ids(q.double(), keys.double(), ids, indptr, indices))


def _rank_ops(args, kwargs, backend):
    from kdfast.ops import rank_of_ids as rank_op

    q, keys, ids = args
    indptr, indices = kwargs["exclude"]
    return [
        (rank_op._rank_op, (q, keys, ids, indptr, indices, -1, backend)),
        (rank_op._rank_op, (q, keys, ids, indptr, indices, 3, backend)),
    ]


def _rank_ids(change):
    def mutate(a, kw):
        return _swap(a, 2, change(a[2].clone())), kw

    return mutate


RANK_OF_IDS = Spec(
    name="rank_of_ids",
    make=_rank_make,
    call=lambda a, kw, b: _rank_pair(kdfast.rank_of_ids(*a, backend=b, **kw)),
    oracle=_rank_oracle,
    ops=_rank_ops,
    bad=[
        ("ids too large", _rank_ids(lambda i: i + 31), ValueError, "ids holds ids outside"),
        ("ids below -1", _rank_ids(lambda i: i - 40), ValueError, "ids holds ids outside"),
        ("ids float", _rank_ids(lambda i: i.float()), TypeError, "ids must be an integer"),
        ("ids 1-D", _rank_ids(lambda i: i[0]), ValueError, "ids must be 2-D"),
        ("ids rows", _rank_ids(lambda i: i[:2]), ValueError, "ids must have 6 rows"),
        (
            "queries 1-D",
            lambda a, kw: (_swap(a, 0, a[0][0]), kw),
            ValueError,
            "queries must be 2-D",
        ),
        ("keys integer", lambda a, kw: (_swap(a, 1, a[1].long()), kw), TypeError, "keys must be"),
        ("d differs", lambda a, kw: (_swap(a, 1, a[1][:, :3]), kw), ValueError, "same dimension"),
        ("dtypes differ", lambda a, kw: (_swap(a, 1, a[1].half()), kw), TypeError, "same dtype"),
        ("exclude rows", _excl(lambda ip, ix: (ip[:-1], ix)), ValueError, "exclude indptr"),
        ("exclude id", _excl(lambda ip, ix: (ip, ix + 100)), ValueError, "exclude indices"),
        (
            "key_bias length",
            lambda a, kw: (a, _with(kw, key_bias=torch.zeros(3, device=a[1].device))),
            ValueError,
            "key_bias must have one value per key",
        ),
        ("score", lambda a, kw: (a, _with(kw, score="l1")), ValueError, "score"),
        ("max_rank < 0", lambda a, kw: (a, _with(kw, max_rank=-1)), ValueError, "max_rank"),
    ],
)
SPECS.append(RANK_OF_IDS)
