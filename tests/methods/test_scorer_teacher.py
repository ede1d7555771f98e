"""A teacher known by its scores only (kdfast.scorer_teacher): the ranking methods build from it
exactly as from tables with the same scores, the table methods refuse it by name."""

import pytest
import torch

import kdfast
from kdfast.methods.base import SCORER_METHODS
from kdfast.methods.registry import METHODS, method_class, validate_options
from tests.methods._helpers import teacher_setup
from tests.methods.test_contract import SMALL, D, _batch, _student, n_items, n_users


def _tables():
    # integer-valued tables: every score is exact, so the scorer's ranking equals the tables'
    tu, ti, train, _ = teacher_setup(n_users=n_users, n_items=n_items)
    return tu.round(), ti.round(), train


def _loss(name, tu, ti, train):
    cls, _ = method_class(name)
    opts = validate_options(name, SMALL.get(name, {}))
    m = cls.build(tu, ti, train, D, generator=torch.Generator().manual_seed(7), **opts)
    su, si = _student()
    m.start_epoch(0, 3, su.detach(), si.detach())
    loss = m(su, si, *_batch())
    loss.backward()
    return loss.detach(), su.grad, si.grad


def _takes_scorer(name):
    return method_class(name)[0].name in SCORER_METHODS


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if _takes_scorer(n)])
def test_ranking_methods_build_from_a_scorer_as_from_tables(name):
    tu, ti, train = _tables()
    want = _loss(name, tu, ti, train)
    calls = []

    def score_fn(users, items):
        calls.append((users.numel(), items.numel()))
        return tu[users] @ ti[items].T

    got = _loss(name, *kdfast.scorer_teacher(score_fn, n_users, n_items, tile_elems=900), train)
    assert calls and max(q * n for q, n in calls) <= 900  # it went through the scorer, in tiles
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if not _takes_scorer(n)])
def test_table_methods_refuse_a_scorer_by_name(name):
    _, _, train = _tables()
    cls, _ = method_class(name)
    views = kdfast.scorer_teacher(lambda u, i: torch.zeros(len(u), len(i)), n_users, n_items)
    with pytest.raises(ValueError, match=f"{cls.name} needs the teacher's embedding tables"):
        cls.build(*views, train, D, **validate_options(name, SMALL.get(name, {})))


def test_views_must_be_one_teachers_pair_in_order():
    _, _, train = _tables()
    a = kdfast.scorer_teacher(lambda u, i: torch.zeros(len(u), len(i)), n_users, n_items)
    b = kdfast.scorer_teacher(lambda u, i: torch.zeros(len(u), len(i)), n_users, n_items)
    for pair in ((a[1], a[0]), (a[0], b[1])):
        with pytest.raises(ValueError, match="scorer_teacher returns"):
            kdfast.RRD.build(*pair, train, D, **SMALL["rrd"])
    with pytest.raises(TypeError, match="score_fn must be callable"):
        kdfast.scorer_teacher("nope", n_users, n_items)


def test_distill_from_neumf_through_its_scores():
    from kdfast import data as kd

    split = kd.make_split(kd.synthetic(60, 90, seed=1), "full", seed=0)
    g = torch.Generator().manual_seed(0)
    teacher = kdfast.NeuMF(split.n_users, split.n_items, 8, generator=g)
    kdfast.Trainer(teacher, split, epochs=3, lr=1e-2, progress=False, log=None).fit()
    views = kdfast.scorer_teacher(teacher.score_pairs, split.n_users, split.n_items)
    rrd = kdfast.RRD.build(*views, split.train, 4, N=20, K=5, L=5, generator=g)
    _, want = kdfast.topk_from_scorer(teacher.score_pairs, split.n_users, split.n_items, 20,
                                      exclude=split.train)  # fmt: skip
    assert torch.equal(rrd.user_side.top, want)
    student = kdfast.BPRMF(split.n_users, split.n_items, 4, generator=g)
    r = kdfast.Trainer(student, split, method=rrd, epochs=2, progress=False, log=None).fit()
    assert r["test"]["Recall@50"] > 0
