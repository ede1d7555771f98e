"""DCD: ranks, samples and their law, the loss against a loop, options, determinism, and that KD
alone teaches."""

import math

import pytest
import torch

import kdfast
from kdfast.methods.dcd import SATURATE, sample_without_replacement
from tests.methods._helpers import assert_finite_loss_with_gradient, top_overlap, train_kd_alone
from tests.methods._helpers import teacher_setup as _setup


def _student(n_users, n_items, d=6, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.nn.Parameter(torch.randn(n_users, d, generator=g) * scale),
        torch.nn.Parameter(torch.randn(n_items, d, generator=g) * scale),
    )


SMALL = dict(N=12, K=5, eps=2.0)
# the variants beside the defaults (the contract test runs those)
VARIANTS = [{"rank": "list"}, {"over": "student"}, {"item_side": False}]


def _observed(train, u):
    indptr, idx = train
    return set(idx[indptr[u] : indptr[u + 1]].tolist())


def _unobserved_rank(scores, observed):
    """Brute-force 0-based rank of every id among the unobserved ids (strictly higher scores; ties
    to the lower id)."""
    n = scores.numel()
    unobs = torch.tensor([j not in observed for j in range(n)])
    ids = torch.arange(n)
    above = (scores[None, :] > scores[:, None]) | (
        (scores[None, :] == scores[:, None]) & (ids[None, :] < ids[:, None])
    )
    return (above & unobs[None, :]).sum(1).tolist()  # row i: the unobserved j ranked above i


@pytest.mark.parametrize("opts", VARIANTS)
def test_forward_finite_with_gradient(opts):
    tu, ti, train, g = _setup()
    m = kdfast.DCD.build(tu, ti, train, 6, generator=g, **SMALL, **opts)
    su, si = _student(24, 90, scale=0.3)
    m.start_epoch(0, 5, su.detach(), si.detach())
    users, pos = torch.randint(0, 24, (32,), generator=g), torch.randint(0, 90, (32,), generator=g)
    loss = m(su, si, users, pos, pos)
    assert_finite_loss_with_gradient(loss, su, si)


def test_ranks_probabilities_and_samples_user_side():
    tu, ti, train, g = _setup()
    m = kdfast.DCD.build(tu, ti, train, 6, generator=g, item_side=False, **SMALL)
    side = m.user_side
    su, si = _student(24, 90)
    m.start_epoch(0, 5, su.detach(), si.detach())
    t_scores, s_scores = tu @ ti.T, su.detach() @ si.detach().T
    depth = SMALL["N"] + math.ceil(SATURATE * SMALL["eps"])
    assert side.depth == depth
    for u in range(24):
        obs = _observed(train, u)
        top = side.teacher[u].tolist()
        assert len(top) == SMALL["N"] and not (obs & set(top))
        assert bool((t_scores[u, side.teacher[u]][1:] <= t_scores[u, side.teacher[u]][:-1]).all())
        full = _unobserved_rank(s_scores[u], obs)
        want = torch.tensor([min(full[i], depth) for i in top])
        assert torch.equal(side.rank_s[u], want)
        d = torch.tensor([full[i] for i in top]) - torch.arange(SMALL["N"])
        # the clamp at `depth` changes no probability (tanh saturates to 1.0 in float32)
        torch.testing.assert_close(
            side.p_under[u], torch.tanh(torch.clamp(d.float() / SMALL["eps"], min=0))
        )
        torch.testing.assert_close(
            side.p_over[u], torch.tanh(torch.clamp(-d.float() / SMALL["eps"], min=0))
        )
        under = [i for i in side.under[u].tolist() if i >= 0]
        over = [i for i in side.over_ids[u].tolist() if i >= 0]
        n_pos_under, n_pos_over = int((d > 0).sum()), int((d < 0).sum())
        assert len(under) == min(SMALL["K"], n_pos_under) and len(over) == min(
            SMALL["K"], n_pos_over
        )
        assert all(d[top.index(i)] > 0 for i in under) and all(d[top.index(i)] < 0 for i in over)
        assert [top.index(i) for i in under] == sorted(top.index(i) for i in under)  # teacher order
        assert len(set(under)) == len(under) and len(set(over)) == len(over)
        assert not ((set(under) | set(over)) & obs)
        # padding only at the end
        assert all(x < 0 for x in side.under[u].tolist()[len(under) :])


def test_list_rank_is_the_authors_within_list_rank():
    tu, ti, train, g = _setup()
    m = kdfast.DCD.build(tu, ti, train, 6, generator=g, rank="list", **SMALL)
    su, si = _student(24, 90)
    m.start_epoch(0, 5, su.detach(), si.detach())
    for side, q, k in ((m.user_side, su, si), (m.item_side, si, su)):
        for r in range(0, side.teacher.shape[0], 7):
            s = (q[r] @ k[side.teacher[r]].T).detach()
            want = [
                sum(1 for j in range(s.numel()) if s[j] > s[i] or (s[j] == s[i] and j < i))
                for i in range(s.numel())
            ]
            assert side.rank_s[r].tolist() == want
            d = torch.tensor(want) - torch.arange(s.numel())
            assert all(
                d[side.teacher[r].tolist().index(i)] < 0
                for i in side.over_ids[r].tolist()
                if i >= 0
            )


def test_item_side_ranks_users_among_non_interacting_users():
    tu, ti, train, g = _setup()
    m = kdfast.DCD.build(tu, ti, train, 6, generator=g, N=12, K=5, N_I=8, K_I=3, eps=2.0)
    side = m.item_side
    su, si = _student(24, 90)
    m.start_epoch(0, 5, su.detach(), si.detach())
    assert side.teacher.shape == (90, 8) and side.under.shape == (90, 3)
    t_scores, s_scores = (ti @ tu.T), (si @ su.T).detach()
    for i in range(0, 90, 9):
        users_of_i = {u for u in range(24) if i in _observed(train, u)}
        top = side.teacher[i].tolist()
        assert (
            top
            == sorted(
                (u for u in range(24) if u not in users_of_i), key=lambda u: -float(t_scores[i, u])
            )[:8]
        )
        full = _unobserved_rank(s_scores[i], users_of_i)
        assert side.rank_s[i].tolist() == [min(full[u], side.depth) for u in top]


def test_over_student_uses_the_students_own_top_list():
    tu, ti, train, g = _setup()
    m = kdfast.DCD.build(tu, ti, train, 6, generator=g, over="student", item_side=False, **SMALL)
    side = m.user_side
    su, si = _student(24, 90)
    m.start_epoch(0, 5, su.detach(), si.detach())
    assert side.teacher.shape[1] == SMALL["N"] + math.ceil(SATURATE * SMALL["eps"])
    t_scores, s_scores = tu @ ti.T, su.detach() @ si.detach().T
    for u in range(24):
        obs = _observed(train, u)
        s_rank, t_rank = _unobserved_rank(s_scores[u], obs), _unobserved_rank(t_scores[u], obs)
        own = sorted((i for i in range(90) if i not in obs), key=lambda i: s_rank[i])[: SMALL["N"]]
        assert side.over_cand[u].tolist() == own
        want = torch.tanh(
            torch.clamp(
                torch.tensor([t_rank[i] - s_rank[i] for i in own]).float() / SMALL["eps"], min=0
            )
        )
        torch.testing.assert_close(side.p_over[u], want)
        for i in side.over_ids[u].tolist():
            if i >= 0:
                assert i in own and t_rank[i] > s_rank[i]


def test_sampler_law_chi_square():
    # first draw of Gumbel-top-k ~ p / sum(p); zero-probability entries never drawn; draws are
    # distinct
    p = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.0, 4.0, 0.25])
    rows = 20000
    g = torch.Generator().manual_seed(3)
    first = sample_without_replacement(p.expand(rows, -1), 1, g)[:, 0]
    counts = torch.bincount(first, minlength=p.numel()).double()
    assert counts[0] == 0 and counts[4] == 0
    nz = p > 0
    expect = rows * p[nz].double() / p.sum()
    chi2 = float(((counts[nz] - expect) ** 2 / expect).sum())
    assert chi2 < 25.0  # 4 degrees of freedom: p-value ~ 5e-5
    # the pair law of successive draws: P(first=a, second=b) = p_a / S * p_b / (S - p_a)
    two = sample_without_replacement(p.expand(rows, -1), 2, g)
    assert bool((two[:, 0] != two[:, 1]).all())
    pa, pb = 5, 2
    want = rows * (p[pa] / p.sum() * p[pb] / (p.sum() - p[pa])).item()
    got = int(((two[:, 0] == pa) & (two[:, 1] == pb)).sum())
    assert abs(got - want) < 5 * math.sqrt(want)
    # fewer positive entries than k: all of them, then padding
    short = sample_without_replacement(torch.tensor([[0.0, 3.0, 0.0, 1.0]]), 3, g)
    assert sorted(short[0, :2].tolist()) == [1, 3] and short[0, 2].item() == -1


def test_loss_matches_loop_reference():
    tu, ti, train, g = _setup()
    m = kdfast.DCD.build(
        tu, ti, train, 6, generator=g, N=12, K=5, N_I=8, K_I=3, eps=2.0, lam=0.3, lam_item=0.7
    )
    su, si = _student(24, 90)
    su, si = su.detach().double(), si.detach().double()
    m.start_epoch(0, 5, su, si)
    users, pos = torch.tensor([3, 5, 3, 7]), torch.tensor([10, 11, 10, 40])

    def listwise(q, k, under, over):
        s = [float(q @ k[i]) for i in under if i >= 0]
        t = [float(q @ k[i]) for i in over if i >= 0]
        return -sum(
            s[a] - math.log(sum(math.exp(x) for x in s[a:]) + sum(math.exp(x) for x in t))
            for a in range(len(s))
        )

    want = 0.3 * sum(
        listwise(su[u], si, m.user_side.under[u].tolist(), m.user_side.over_ids[u].tolist())
        for u in (3, 5, 7)
    )
    want += 0.7 * sum(
        listwise(si[i], su, m.item_side.under[i].tolist(), m.item_side.over_ids[i].tolist())
        for i in (10, 11, 40)
    )
    got = m(su, si, users, pos, pos)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_rows_without_positive_probability_contribute_nothing():
    tu, ti, train, g = _setup()
    m = kdfast.DCD.build(tu, ti, train, 6, generator=g, rank="list", item_side=False, **SMALL)
    # a student whose scores equal the teacher's: zero discrepancy everywhere, nothing to sample
    m.start_epoch(0, 5, tu.clone(), ti.clone())
    assert bool((m.user_side.under < 0).all()) and bool((m.user_side.over_ids < 0).all())
    su, si = torch.nn.Parameter(tu.clone()), torch.nn.Parameter(ti.clone())
    loss = m(su, si, torch.arange(24), torch.arange(24), torch.arange(24))
    assert loss.item() == 0.0


def test_rank_every_keeps_ranks_but_resamples():
    tu, ti, train, _ = _setup()
    m = kdfast.DCD.build(
        tu, ti, train, 6, generator=torch.Generator().manual_seed(2), rank_every=2, **SMALL
    )
    su, si = _student(24, 90)
    m.start_epoch(0, 5, su.detach(), si.detach())
    ranks, under = m.user_side.rank_s.clone(), m.user_side.under.clone()
    su2, si2 = _student(24, 90, seed=9)
    m.start_epoch(1, 5, su2.detach(), si2.detach())  # odd epoch: old ranks, new samples
    assert torch.equal(m.user_side.rank_s, ranks) and not torch.equal(m.user_side.under, under)
    m.start_epoch(2, 5, su2.detach(), si2.detach())
    assert not torch.equal(m.user_side.rank_s, ranks)


@pytest.mark.parametrize("opts", [{}, {"rank": "list"}])
def test_kd_alone_increases_agreement_with_teacher(opts):
    torch.manual_seed(0)
    tu, ti, train, g = _setup(n_users=30, n_items=120, dt=8, seed=1)
    m = kdfast.DCD.build(
        tu, ti, train, 8, generator=g, N=20, K=8, eps=2.0, lam=1.0, lam_item=1.0, **opts
    )
    su = torch.nn.Parameter(torch.randn(30, 8) * 0.1)
    si = torch.nn.Parameter(torch.randn(120, 8) * 0.1)
    top10 = m.user_side.teacher[:, :10]
    before = top_overlap(su, si, top10, train)
    users = torch.arange(30)
    train_kd_alone(m, su, si, users, torch.arange(120)[:30] * 4, users)
    assert top_overlap(su, si, top10, train) > before + 0.2


def test_bad_options_and_inputs():
    tu, ti, train, g = _setup()
    for bad, match in (
        ({"N": 0}, "N"),
        ({"K": 0}, "K"),
        ({"eps": 0.0}, "eps"),
        ({"eps": math.inf}, "eps"),
        ({"lam": -1.0}, "lam"),
        ({"lam_item": 0}, "lam_item"),
        ({"rank": "full"}, "rank"),
        ({"over": "both"}, "over"),
        ({"rank": "list", "over": "student"}, "over"),
        ({"item_side": "yes"}, "item_side"),
        ({"N": 200}, "N"),
        ({"N_I": 0}, "N_I"),
        ({"K_I": 0}, "K_I"),
        ({"N": 87}, "N"),
        ({"rank_every": 0}, "rank_every"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            kdfast.DCD.build(tu, ti, train, 6, **{**SMALL, **bad})
    m = kdfast.DCD.build(tu, ti, train, 6, generator=g, **SMALL)
    su, si = torch.randn(24, 6), torch.randn(90, 6)
    with pytest.raises(RuntimeError, match="start_epoch"):
        m(su, si, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
