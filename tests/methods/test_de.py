"""DE against direct re-computations of docs/METHODS.md section 2."""

import pytest
import torch

import kdfast
from tests.methods._helpers import entity_setup


def _setup(seed=0):
    return entity_setup(seed=seed)


def test_de_one_expert_equals_plain_mlp_projection():
    tu, ti, su, si, users, pos, neg = _setup()
    m = kdfast.DE.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(3), n_experts=1)
    m.start_epoch(3, 10, su, si)
    got = m(su, si, users, pos, neg)

    def mlp(side, x):
        e = m.experts[side]
        return torch.relu(x @ e.w1[0] + e.b1[0]) @ e.w2[0] + e.b2[0]

    def loss_of(side, t, s, ids):
        return ((t[ids] - mlp(side, s[ids])) ** 2).sum()

    want = 0.01 * (
        loss_of("user", tu, su, users.unique())
        + 0.5 * (loss_of("item", ti, si, pos.unique()) + loss_of("item", ti, si, neg.unique()))
    )
    torch.testing.assert_close(got, want)


def test_de_matches_direct_formula_with_same_noise():
    tu, ti, su, si, users, pos, neg = _setup(seed=4)
    m = kdfast.DE.build(
        tu, ti, None, 4, generator=torch.Generator().manual_seed(5), n_experts=3, lambda_de=0.3
    )
    m.start_epoch(2, 10, su, si)
    state = m._noise.get_state()
    got = m(su, si, users, pos, neg)
    m._noise.set_state(state)

    def loss_of(side, t, s, ids):
        alpha = torch.softmax(t[ids] @ m.selectors[side].weight.T + m.selectors[side].bias, dim=1)
        u = torch.rand(alpha.shape, generator=m._noise)
        z = torch.softmax(
            (torch.log(alpha + 1e-10) - torch.log(-torch.log(u + 1e-20) + 1e-20)) / m.tau, dim=1
        )
        e = m.experts[side]
        hhat = sum(
            z[:, k : k + 1] * (torch.relu(s[ids] @ e.w1[k] + e.b1[k]) @ e.w2[k] + e.b2[k])
            for k in range(3)
        )
        return ((t[ids] - hhat) ** 2).sum()

    want = 0.3 * (
        loss_of("user", tu, su, users.unique())
        + 0.5 * (loss_of("item", ti, si, pos.unique()) + loss_of("item", ti, si, neg.unique()))
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    assert su.grad is not None and m.selectors["user"].weight.grad is not None


def test_de_selected_expert_path_once_tau_is_small():
    tu, ti, su, si, users, pos, neg = _setup(seed=6)
    exact = kdfast.DE.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(7))
    fast = kdfast.DE.build(
        tu, ti, None, 4, generator=torch.Generator().manual_seed(7), select_only_below=1e-3
    )
    for m in (exact, fast):
        m.start_epoch(90, 100, su, si)  # tau = 1e-9: the Gumbel-softmax is one-hot in float32
    torch.testing.assert_close(
        fast(su, si, users, pos, neg), exact(su, si, users, pos, neg), rtol=1e-5, atol=1e-5
    )


def test_bad_options():
    tu, ti, *_ = _setup()
    with pytest.raises(ValueError, match="n_experts must be >= 1"):
        kdfast.DE.build(tu, ti, None, 4, n_experts=0)
    with pytest.raises(ValueError, match="tau0"):
        kdfast.DE.build(tu, ti, None, 4, tau0=0)


@pytest.mark.parametrize("cls", [kdfast.DE, kdfast.HTD])
def test_temperature_schedule_and_the_authors_delay(cls):
    # kdfast anneals from the first epoch; tau_delay=1 is the authors' loop, which sets epoch e's
    # tau from e - 1 (tau0 for epochs 0 and 1), i.e. kdfast's value one epoch later
    tu, ti, su, si, *_ = _setup()
    taus = {}
    for delay in (0, 1):
        m = cls.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(0), tau_delay=delay)
        taus[delay] = []
        for epoch in range(5):
            m.start_epoch(epoch, 4, su, si)
            taus[delay].append(m.tau)
    assert taus[0] == pytest.approx([1.0, 1e-10**0.25, 1e-10**0.5, 1e-10**0.75, 1e-10])
    assert taus[1] == pytest.approx([1.0, 1.0, 1e-10**0.25, 1e-10**0.5, 1e-10**0.75])
    with pytest.raises(ValueError, match="tau_delay"):
        cls.build(tu, ti, None, 4, tau_delay=-1)


def test_expert_hidden_width_follows_the_authors():
    # d_s -> (d_s + d_t) // 2 -> d_t, and d_s -> d_t // 2 -> d_t when the dimensions are equal
    tu, ti, *_ = _setup()  # d_t = 12
    for d_s, hidden in ((4, 8), (12, 6)):
        m = kdfast.DE.build(tu, ti, None, d_s, generator=torch.Generator().manual_seed(0))
        assert tuple(m.experts["user"].w1.shape) == (30, d_s, hidden)
        assert tuple(m.experts["item"].w2.shape) == (30, hidden, 12)
