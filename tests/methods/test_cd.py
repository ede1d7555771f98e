"""CD (Collaborative Distillation, ICDM'19): rank-aware samples from the teacher's top-N, soft
labels, the loss value, errors, and that the KD loss alone moves a student towards the teacher's
ranking."""

import math

import pytest
import torch

from kdfast.methods.cd import CD
from tests.methods._helpers import assert_finite_loss_with_gradient, top_overlap, train_kd_alone
from tests.methods._helpers import teacher_setup as _setup


def _observed(train, u):
    indptr, idx = train
    return set(idx[indptr[u] : indptr[u + 1]].tolist())


def _student(n_users, n_items, d, g):
    return (
        torch.nn.Parameter(torch.randn(n_users, d, generator=g) * 0.1),
        torch.nn.Parameter(torch.randn(n_items, d, generator=g) * 0.1),
    )


SMALL = dict(N=30, K=6, T=5.0)


def test_gradient_reaches_only_the_batch_users():
    tu, ti, train, g = _setup()
    m = CD.build(tu, ti, train, 6, generator=g, **SMALL)
    su, si = _student(24, 90, 6, g)
    m.start_epoch(0, 5, su.detach(), si.detach())
    users = torch.randint(0, 24, (32,), generator=g)
    loss = m(su, si, users, users % 90, users % 90)
    assert_finite_loss_with_gradient(loss, su, si)
    ub = set(users.tolist())
    assert all((su.grad[u].abs().sum() > 0) == (u in ub) for u in range(24))


def test_a_user_repeated_in_the_batch_counts_once():
    # the KD term sums over the batch's unique users (not its rows)
    tu, ti, train, g = _setup()
    m = CD.build(tu, ti, train, 6, generator=g, **SMALL)
    su, si = _student(24, 90, 6, g)
    m.start_epoch(0, 5, su.detach(), si.detach())
    once = torch.tensor([3, 7, 11])
    twice = torch.tensor([3, 7, 11, 3, 3, 7])
    a = m(su, si, once, once, once)
    b = m(su, si, twice, twice, twice)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_teacher_list_samples_and_soft_labels():
    tu, ti, train, g = _setup()
    m = CD.build(tu, ti, train, 6, generator=g, T_label=3.0, **SMALL)
    m.start_epoch(0, 5, None, None)
    scores = tu @ ti.T
    for u in range(24):
        obs = _observed(train, u)
        masked = scores[u].clone()
        masked[list(obs)] = -math.inf
        # teacher order, no training item
        assert m.top[u].tolist() == torch.topk(masked, 30).indices.tolist()
        pos = m.positions[u]
        # distinct, sorted
        assert bool((pos[1:] > pos[:-1]).all()) and 0 <= int(pos[0]) and int(pos[-1]) < 30
        assert m.items[u].tolist() == m.top[u, pos].tolist()
        assert not (obs & set(m.items[u].tolist()))
        torch.testing.assert_close(
            m.labels[u], torch.sigmoid(scores[u, m.items[u]] / 3.0), rtol=1e-5, atol=1e-6
        )


def test_sample_distribution_matches_rank_discount():
    """With K=1 the sampled position follows p(r) ~ exp(-r/T) over r = 1..N (chi-square, fixed
    seed)."""
    tu, ti, train, g = _setup(n_users=200, n_items=40, per_user=3)
    N, T = 12, 4.0
    m = CD.build(tu, ti, train, 4, generator=g, N=N, K=1, T=T)
    counts = torch.zeros(N)
    for e in range(10):
        m.start_epoch(e, 10, None, None)
        counts += torch.bincount(m.positions[:, 0], minlength=N).float()
    p = torch.exp(-torch.arange(1, N + 1, dtype=torch.float64) / T)
    expected = 2000 * p / p.sum()
    chi2 = ((counts.double() - expected) ** 2 / expected).sum().item()
    assert chi2 < 40.0  # 11 degrees of freedom: the 0.9999 quantile is about 36


def test_samples_change_every_epoch():
    tu, ti, train, g = _setup()
    m = CD.build(tu, ti, train, 6, generator=g, **SMALL)
    m.start_epoch(0, 5, None, None)
    first = m.positions.clone()
    m.start_epoch(1, 5, None, None)
    assert not torch.equal(first, m.positions)


def test_loss_against_loop_reference():
    tu, ti, train, g = _setup()
    lam, tl = 0.3, 2.0
    m = CD.build(tu, ti, train, 5, generator=g, lam=lam, T_label=tl, **SMALL)
    su = torch.randn(24, 5, generator=g, dtype=torch.float64) * 2
    si = torch.randn(90, 5, generator=g, dtype=torch.float64) * 2
    users = torch.tensor([3, 7, 3, 11, 20, 7])
    got = m(su, si, users, users, users)
    want = 0.0
    for u in sorted(set(users.tolist())):
        for i in m.items[u].tolist():
            q = 1 / (1 + math.exp(-float(tu[u] @ ti[i]) / tl))
            p = 1 / (1 + math.exp(-float(su[u] @ si[i])))
            want += -(q * math.log(p) + (1 - q) * math.log(1 - p))
    assert got.item() == pytest.approx(lam * want, rel=1e-5)


def test_n_capped_at_unobserved_items():
    tu, ti, train, g = _setup(n_items=30, per_user=5)
    m = CD.build(tu, ti, train, 6, generator=g, K=4)  # default N=3000 > the 25 unobserved items
    assert m.N == 25 and m.top.shape == (24, 25) and bool((m.top >= 0).all())
    assert m.T == 2.5  # default T = N / 10 with the capped N
    for u in range(24):
        assert set(m.top[u].tolist()) == set(range(30)) - _observed(train, u)


def test_kd_alone_moves_student_towards_teacher_ranking():
    torch.manual_seed(0)
    tu, ti, train, g = _setup(n_users=30, n_items=120, dt=8, seed=1)
    m = CD.build(tu, ti, train, 8, generator=g, N=100, K=20, T=20.0, lam=1.0)
    su, si = _student(30, 120, 8, g)
    top10 = m.top[:, :10]

    before = top_overlap(su, si, top10, train)
    users = torch.arange(30)
    train_kd_alone(m, su, si, users, users, users)
    assert top_overlap(su, si, top10, train) > before + 0.2


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"K": 0}, "K"),
        ({"K": 31}, "K"),
        ({"N": 0}, "N"),
        ({"N": 2.0}, "N"),
        ({"T": 0.0}, "T"),
        ({"T": math.inf}, "T"),
        ({"T_label": -2.0}, "T_label"),
        ({"lam": 0}, "lam"),
        ({"lam": None}, "lam"),
    ],
)
def test_bad_options(opts, match):
    tu, ti, train, _ = _setup()
    with pytest.raises((ValueError, TypeError), match=match):
        CD.build(tu, ti, train, 6, **{**SMALL, **opts})
