"""RD (Ranking Distillation, KDD'18): teacher top-K, weights, rank estimate, loss value, errors, and
that the KD loss alone teaches the teacher's top items."""

import math

import pytest
import torch

from kdfast.methods.rd import RD
from tests.methods._helpers import assert_finite_loss_with_gradient, top_overlap, train_kd_alone
from tests.methods._helpers import teacher_setup as _setup


def _observed(train, u):
    indptr, idx = train
    return set(idx[indptr[u] : indptr[u + 1]].tolist())


def _student(n_users, n_items, d, g, dtype=torch.float32):
    su = torch.nn.Parameter((torch.randn(n_users, d, generator=g) * 0.1).to(dtype))
    si = torch.nn.Parameter((torch.randn(n_items, d, generator=g) * 0.1).to(dtype))
    return su, si


@pytest.mark.parametrize("epoch", [0, 3])  # static weights, then dynamic (warmup=2)
def test_gradient_reaches_only_the_batch_users_and_their_top_items(epoch):
    tu, ti, train, g = _setup()
    m = RD.build(tu, ti, train, 6, generator=g, n_sample=20, warmup=2)
    su, si = _student(24, 90, 6, g)
    m.start_epoch(epoch, 5, su.detach(), si.detach())
    users = torch.randint(0, 24, (32,), generator=g)
    loss = m(su, si, users, users % 90, users % 90)
    assert_finite_loss_with_gradient(loss, su, si)
    # only the batch's users and their top-K items get a gradient
    ub = set(users.tolist())
    assert all((su.grad[u].abs().sum() > 0) == (u in ub) for u in range(24))
    items = set(m.top[sorted(ub)].flatten().tolist())
    assert all(bool(si.grad[i].abs().sum() > 0) <= (i in items) for i in range(90))


def test_teacher_top_k_excludes_training_items_in_order():
    tu, ti, train, g = _setup()
    m = RD.build(tu, ti, train, 6, generator=g, K=7)
    scores = tu @ ti.T
    for u in range(24):
        obs = _observed(train, u)
        masked = scores[u].clone()
        masked[list(obs)] = -math.inf
        assert m.top[u].tolist() == torch.topk(masked, 7).indices.tolist()
        assert not (obs & set(m.top[u].tolist()))


def test_static_weights():
    tu, ti, train, g = _setup()
    for lw in (1.0, 3.0):
        m = RD.build(tu, ti, train, 6, generator=g, K=5, lambda_w=lw)
        w = [math.exp(-r / lw) for r in range(1, 6)]
        want = torch.tensor([x / sum(w) for x in w])
        torch.testing.assert_close(m.static_weights, want)
        # warm-up: static rows for everyone
        m.start_epoch(0, 5, torch.zeros(24, 6), torch.zeros(90, 6))
        torch.testing.assert_close(m.weights, want.expand(24, 5))
        assert m.rank_estimate is None


@pytest.mark.parametrize("renormalize", [True, False])
def test_dynamic_weights_and_loss_against_loop_reference(renormalize):
    tu, ti, train, g = _setup()
    K, n, mu, lam = 6, 30, 0.3, 0.7
    m = RD.build(
        tu,
        ti,
        train,
        5,
        generator=g,
        K=K,
        n_sample=n,
        mu=mu,
        lam=lam,
        warmup=1,
        renormalize=renormalize,
    )
    su = torch.randn(24, 5, generator=g, dtype=torch.float64)
    si = torch.randn(90, 5, generator=g, dtype=torch.float64)
    m.start_epoch(1, 5, su, si)
    static = [math.exp(-r) for r in range(1, K + 1)]
    static = [x / sum(static) for x in static]
    users = torch.tensor([3, 7, 3, 11, 20])
    want = 0.0
    for u in range(24):
        samples = m.rank_samples[u].tolist()
        assert len(set(samples)) == n and not (set(samples) & _observed(train, u))
        w = []
        for r in range(K):
            s_item = float(su[u] @ si[m.top[u, r]])
            above = sum(float(su[u] @ si[j]) > s_item for j in samples)
            rhat = (above * 89) // n
            assert int(m.rank_estimate[u, r]) == rhat
            w.append(static[r] * max(math.tanh(mu * (rhat - r)), 0.0))
        if renormalize:
            w = [x / sum(w) for x in w] if sum(w) > 0 else [0.0] * K
        torch.testing.assert_close(
            m.weights[u].double(), torch.tensor(w, dtype=torch.float64), rtol=1e-5, atol=1e-7
        )
        if u in set(users.tolist()):
            want += sum(
                w[r] * -math.log(1 / (1 + math.exp(-float(su[u] @ si[m.top[u, r]]))))
                for r in range(K)
            )
    got = m(su, si, users, users, users)
    assert got.item() == pytest.approx(lam * want, rel=1e-5)


def test_dynamic_weight_follows_student_rank():
    """An item the student ranks above every sample gets weight 0; one it ranks below all the other
    samples gets rhat = floor((I-1) c / n) (c = the samples other than itself) and weight tanh(mu *
    (rhat - 1))."""
    tu, ti, train, g = _setup()
    m = RD.build(tu, ti, train, 4, generator=g, K=3, n_sample=10, warmup=0, renormalize=False)
    su = torch.zeros(24, 4)
    su[:, 0] = 1.0
    si = torch.zeros(90, 4)
    si[m.top[0, 0], 0] = 5.0  # user 0: teacher's 1st item on top of the student's list
    si[m.top[0, 1], 0] = -5.0  # teacher's 2nd item at the bottom
    m.start_epoch(0, 5, su, si)
    assert m.rank_estimate[0, 0] == 0 and m.weights[0, 0] == 0
    c = int((m.rank_samples[0] != m.top[0, 1]).sum())
    rhat = 89 * c // 10
    assert m.rank_estimate[0, 1] == rhat and rhat >= 80
    assert m.weights[0, 1].item() == pytest.approx(
        m.static_weights[1].item() * math.tanh(0.1 * (rhat - 1)), rel=1e-5
    )


def test_rank_samples_are_uniform_over_unobserved_items():
    tu, ti, train, g = _setup(n_users=40, n_items=30, per_user=10)
    m = RD.build(tu, ti, train, 4, generator=g, K=3, n_sample=5, warmup=0)
    counts = torch.zeros(40, 30)
    for e in range(25):
        m.start_epoch(e, 25, torch.randn(40, 4, generator=g), torch.randn(30, 4, generator=g))
        counts.scatter_add_(1, m.rank_samples, torch.ones(40, 5))
    indptr, idx = train
    obs = torch.zeros(40, 30, dtype=torch.bool)
    obs[torch.repeat_interleave(torch.arange(40), 10), idx] = True
    assert counts[obs].sum() == 0
    # each user's 20 unobserved items are equally likely: 25 epochs x 5 draws = 125 per user
    expected = 125 / 20
    chi2 = (((counts - expected) ** 2 / expected) * (~obs)).sum().item()
    dof = 40 * 19
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof)


def test_n_sample_capped_at_unobserved_items():
    tu, ti, train, g = _setup()
    # default n_sample=100 > 86 unobserved items
    m = RD.build(tu, ti, train, 6, generator=g, warmup=0)
    m.start_epoch(0, 3, torch.randn(24, 6), torch.randn(90, 6))
    assert m.n_sample == 86 and m.rank_samples.shape == (24, 86)
    for u in range(24):
        assert set(m.rank_samples[u].tolist()) == set(range(90)) - _observed(train, u)


def test_dynamic_off_keeps_static_weights():
    tu, ti, train, g = _setup()
    m = RD.build(tu, ti, train, 6, generator=g, dynamic=False, warmup=0)
    m.start_epoch(20, 30, torch.randn(24, 6), torch.randn(90, 6))
    torch.testing.assert_close(m.weights, m.static_weights.expand(24, 10))
    assert m.rank_samples is None


def test_deterministic_with_the_same_seed():
    tu, ti, train, _ = _setup()
    out = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        m = RD.build(tu, ti, train, 6, generator=g, n_sample=20, warmup=0)
        su, si = _student(24, 90, 6, torch.Generator().manual_seed(1))
        m.start_epoch(0, 3, su.detach(), si.detach())
        out.append(
            (
                m.rank_samples.clone(),
                m.weights.clone(),
                m(
                    su,
                    si,
                    torch.arange(24),
                    torch.zeros(24, dtype=torch.long),
                    torch.zeros(24, dtype=torch.long),
                ).item(),
            )
        )
    assert (
        torch.equal(out[0][0], out[1][0])
        and torch.equal(out[0][1], out[1][1])
        and out[0][2] == out[1][2]
    )


def test_kd_alone_moves_student_towards_teacher_top_items():
    torch.manual_seed(0)
    tu, ti, train, g = _setup(n_users=30, n_items=120, dt=8, seed=1)
    m = RD.build(tu, ti, train, 8, generator=g, K=10, lam=1.0, n_sample=30, warmup=20)
    su, si = _student(30, 120, 8, g)
    top10 = m.top

    before = top_overlap(su, si, top10, train)
    users = torch.arange(30)
    train_kd_alone(m, su, si, users, users, users)
    assert top_overlap(su, si, top10, train) > before + 0.2


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"K": 0}, "K"),
        ({"K": 2.5}, "K"),
        ({"K": 87}, "K"),
        ({"lam": 0.0}, "lam"),
        ({"lam": "1"}, "lam"),
        ({"lambda_w": -1.0}, "lambda_w"),
        ({"mu": 0}, "mu"),
        ({"n_sample": 0}, "n_sample"),
        ({"n_sample": 1.0}, "n_sample"),
        ({"warmup": -1}, "warmup"),
        ({"warmup": 1.5}, "warmup"),
        ({"dynamic": 1}, "dynamic"),
        ({"renormalize": "yes"}, "renormalize"),
    ],
)
def test_bad_options(opts, match):
    tu, ti, train, _ = _setup()
    with pytest.raises((ValueError, TypeError), match=match):
        RD.build(tu, ti, train, 6, **opts)
