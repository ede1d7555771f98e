"""DE and PHR (kdfast.methods.latent) against direct re-computations of docs/METHODS.md sections 2 and 3."""
import math

import pytest
import torch
from torch import nn

import kdfast
from kdfast.methods.base import method_class
from kdfast.methods.latent import ExpertBank, gumbel_softmax, temperature


def _setup(d_t=12, d_s=4, n_u=20, n_i=30, seed=0, b=16):
    g = torch.Generator().manual_seed(seed)
    tu, ti = torch.randn(n_u, d_t, generator=g), torch.randn(n_i, d_t, generator=g)
    su = torch.randn(n_u, d_s, generator=g).requires_grad_()
    si = torch.randn(n_i, d_s, generator=g).requires_grad_()
    users = torch.randint(0, n_u, (b,), generator=g)
    pos, neg = torch.randint(0, n_i, (b,), generator=g), torch.randint(0, n_i, (b,), generator=g)
    return tu, ti, su, si, users, pos, neg


def test_temperature_schedule_values():
    assert temperature(0, 100) == 1.0
    assert math.isclose(temperature(50, 100), 1e-5, rel_tol=1e-12)
    assert math.isclose(temperature(100, 100), 1e-10, rel_tol=1e-12)
    assert temperature(500, 100) == 1e-10  # floored
    assert math.isclose(temperature(10, 100, tau0=2.0, tau_end=1e-2), 2.0 * 1e-2 ** 0.1, rel_tol=1e-12)
    vals = [temperature(e, 30) for e in range(31)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError):
        temperature(1, 0)


def test_start_epoch_sets_tau():
    tu, ti, su, si, *_ = _setup()
    for cls in (kdfast.DE, kdfast.HTD):
        m = cls.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(1))
        assert m.tau == 1.0
        m.start_epoch(25, 100, su, si)
        assert math.isclose(m.tau, 1e-10 ** 0.25, rel_tol=1e-12)


def test_expert_bank_matches_loop_over_experts():
    bank = ExpertBank(5, 4, 12, generator=torch.Generator().manual_seed(2))
    x = torch.randn(7, 4)
    w = torch.softmax(torch.randn(7, 5), dim=1)
    want = sum(w[:, m:m + 1] * (torch.relu(x @ bank.w1[m] + bank.b1[m]) @ bank.w2[m] + bank.b2[m]) for m in range(5))
    torch.testing.assert_close(bank(x, w), want, rtol=1e-5, atol=1e-6)
    idx = w.argmax(1)
    sel = bank.forward_selected(x, idx, w.max(1).values)
    want_sel = torch.stack([w[b, idx[b]] * (torch.relu(x[b] @ bank.w1[idx[b]] + bank.b1[idx[b]]) @ bank.w2[idx[b]]
                                             + bank.b2[idx[b]]) for b in range(7)])
    torch.testing.assert_close(sel, want_sel, rtol=1e-5, atol=1e-6)
    assert bank.w1.shape == (5, 4, 8)  # hidden (d_s + d_t) // 2


def test_de_one_expert_equals_plain_mlp_projection():
    tu, ti, su, si, users, pos, neg = _setup()
    m = kdfast.DE.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(3), n_experts=1)
    m.start_epoch(3, 10, su, si)
    got = m(su, si, users, pos, neg)

    def mlp(side, x):
        e = m.experts[side]
        return torch.relu(x @ e.w1[0] + e.b1[0]) @ e.w2[0] + e.b2[0]

    def l(side, t, s, ids):
        return ((t[ids] - mlp(side, s[ids])) ** 2).sum()

    want = 0.01 * (l("user", tu, su, users.unique())
                   + 0.5 * (l("item", ti, si, pos.unique()) + l("item", ti, si, neg.unique())))
    torch.testing.assert_close(got, want)


def test_de_matches_direct_formula_with_same_noise():
    tu, ti, su, si, users, pos, neg = _setup(seed=4)
    m = kdfast.DE.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(5), n_experts=3, lambda_de=0.3)
    m.start_epoch(2, 10, su, si)
    state = m._noise.get_state()
    got = m(su, si, users, pos, neg)
    m._noise.set_state(state)

    def l(side, t, s, ids):
        alpha = torch.softmax(t[ids] @ m.selectors[side].weight.T + m.selectors[side].bias, dim=1)
        u = torch.rand(alpha.shape, generator=m._noise)
        z = torch.softmax((torch.log(alpha + 1e-10) - torch.log(-torch.log(u + 1e-20) + 1e-20)) / m.tau, dim=1)
        e = m.experts[side]
        hhat = sum(z[:, k:k + 1] * (torch.relu(s[ids] @ e.w1[k] + e.b1[k]) @ e.w2[k] + e.b2[k]) for k in range(3))
        return ((t[ids] - hhat) ** 2).sum()

    want = 0.3 * (l("user", tu, su, users.unique())
                  + 0.5 * (l("item", ti, si, pos.unique()) + l("item", ti, si, neg.unique())))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    assert su.grad is not None and m.selectors["user"].weight.grad is not None


def test_de_selected_expert_path_once_tau_is_small():
    tu, ti, su, si, users, pos, neg = _setup(seed=6)
    exact = kdfast.DE.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(7))
    fast = kdfast.DE.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(7), select_only_below=1e-3)
    for m in (exact, fast):
        m.start_epoch(90, 100, su, si)  # tau = 1e-9: the Gumbel-softmax is one-hot in float32
    torch.testing.assert_close(fast(su, si, users, pos, neg), exact(su, si, users, pos, neg), rtol=1e-5, atol=1e-5)


def test_gumbel_softmax_is_one_hot_at_small_tau_and_reproducible():
    p = torch.softmax(torch.randn(6, 5), dim=1)
    z = gumbel_softmax(p, 1e-10, torch.Generator().manual_seed(0))
    assert torch.equal(z.max(1).values, torch.ones(6))
    z1 = gumbel_softmax(p, 0.5, torch.Generator().manual_seed(1))
    z2 = gumbel_softmax(p, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2)
    torch.testing.assert_close(z1.sum(1), torch.ones(6))


def test_phr_matches_direct_formula_and_pnet_is_replaceable():
    tu, ti, su, si, users, pos, neg = _setup(seed=8)
    m = kdfast.PHR.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(9))
    assert m.pnet.net[0].out_features == 12 + 4 * 12 and m.pnet.net[2].out_features == 4 * 12
    got = m(su, si, users, pos, neg)

    def l(t, s, ids):
        w = m.pnet(t[ids]).view(-1, 12, 4)
        return ((t[ids] - torch.einsum("bts,bs->bt", w, s[ids])) ** 2).sum()

    want = 0.01 * (l(tu, su, users.unique()) + 0.5 * (l(ti, si, pos.unique()) + l(ti, si, neg.unique())))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    custom = nn.Linear(12, 48)
    m2 = kdfast.PHR.build(tu, ti, None, 4, pnet=custom)
    assert m2.pnet is custom
    m2(su, si, users, pos, neg).backward()
    assert custom.weight.grad is not None
    with pytest.raises(ValueError, match="pnet must return"):
        kdfast.PHR.build(tu, ti, None, 4, pnet=nn.Linear(12, 5))(su, si, users, pos, neg)
    with pytest.raises(TypeError, match="pnet"):
        kdfast.PHR.build(tu, ti, None, 4, pnet=lambda x: x)


@pytest.mark.parametrize("name", ["de", "phr"])
def test_methods_drop_cleanly(name):
    tu, ti, su, si, users, pos, neg = _setup(seed=10)
    cls, opts = method_class(name)
    m = cls.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(0), **opts)
    own = {id(p) for p in m.parameters()}
    assert id(su) not in own and id(si) not in own
    assert all(not b.requires_grad for b in m.buffers())
    assert "teacher_user" not in m.state_dict()  # teacher buffers are not saved with the method
    loss = m(su, si, users, pos, neg)
    loss.backward()
    assert su.grad is not None
    kept = su.detach().clone()
    del m, loss
    assert torch.equal(su.detach(), kept)


def test_bad_inputs():
    tu, ti, su, si, users, pos, neg = _setup()
    with pytest.raises(ValueError, match="n_experts must be >= 1"):
        kdfast.DE.build(tu, ti, None, 4, n_experts=0)
    with pytest.raises(ValueError, match="teacher_user must be 2-D"):
        kdfast.DE.build(tu[0], ti, None, 4)
    with pytest.raises(TypeError, match="teacher_item must be a floating"):
        kdfast.PHR.build(tu, ti.long(), None, 4)
    with pytest.raises(ValueError, match="same dimension"):
        kdfast.DE.build(tu, ti[:, :5], None, 4)
    m = kdfast.DE.build(tu, ti, None, 4)
    with pytest.raises(ValueError, match="student_user has"):
        m(su[:5], si, users, pos, neg)
    with pytest.raises(ValueError, match="student tables must have 4 columns"):
        m(torch.randn(20, 3), torch.randn(30, 3), users, pos, neg)
    with pytest.raises(TypeError, match="users must be an integer"):
        m(su, si, users.float(), pos, neg)
    with pytest.raises(ValueError, match="tau0"):
        kdfast.DE.build(tu, ti, None, 4, tau0=0)
