"""The pieces DE, PHR and HTD share (kdfast.methods.experts): the temperature schedule, the expert
bank, the Gumbel-softmax, and the annealing of DE and HTD."""

import math

import pytest
import torch

import kdfast
from kdfast.methods.experts import ExpertBank, gumbel_softmax, temperature
from tests.methods._helpers import entity_setup


def _setup(seed=0):
    return entity_setup(seed=seed)


def test_temperature_schedule_values():
    assert temperature(0, 100) == 1.0
    assert math.isclose(temperature(50, 100), 1e-5, rel_tol=1e-12)
    assert math.isclose(temperature(100, 100), 1e-10, rel_tol=1e-12)
    assert temperature(500, 100) == 1e-10  # floored
    assert math.isclose(
        temperature(10, 100, tau0=2.0, tau_end=1e-2), 2.0 * 1e-2**0.1, rel_tol=1e-12
    )
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
        assert math.isclose(m.tau, 1e-10**0.25, rel_tol=1e-12)


def test_expert_bank_matches_loop_over_experts():
    bank = ExpertBank(5, 4, 12, generator=torch.Generator().manual_seed(2))
    x = torch.randn(7, 4)
    w = torch.softmax(torch.randn(7, 5), dim=1)
    want = sum(
        w[:, m : m + 1] * (torch.relu(x @ bank.w1[m] + bank.b1[m]) @ bank.w2[m] + bank.b2[m])
        for m in range(5)
    )
    torch.testing.assert_close(bank(x, w), want, rtol=1e-5, atol=1e-6)
    idx = w.argmax(1)
    sel = bank.forward_selected(x, idx, w.max(1).values)
    want_sel = torch.stack(
        [
            w[b, idx[b]]
            * (
                torch.relu(x[b] @ bank.w1[idx[b]] + bank.b1[idx[b]]) @ bank.w2[idx[b]]
                + bank.b2[idx[b]]
            )
            for b in range(7)
        ]
    )
    torch.testing.assert_close(sel, want_sel, rtol=1e-5, atol=1e-6)
    assert bank.w1.shape == (5, 4, 8)  # hidden (d_s + d_t) // 2


def test_gumbel_softmax_is_one_hot_at_small_tau_and_reproducible():
    p = torch.softmax(torch.randn(6, 5), dim=1)
    z = gumbel_softmax(p, 1e-10, torch.Generator().manual_seed(0))
    assert torch.equal(z.max(1).values, torch.ones(6))
    z1 = gumbel_softmax(p, 0.5, torch.Generator().manual_seed(1))
    z2 = gumbel_softmax(p, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2)
    torch.testing.assert_close(z1.sum(1), torch.ones(6))


def test_expert_bank_selected_only_equals_one_hot_mixture():
    bank = ExpertBank(5, 3, 7, generator=torch.Generator().manual_seed(1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    idx = torch.tensor([0, 4, 2, 2, 1, 3])
    w = torch.nn.functional.one_hot(idx, 5).double() * 0.75
    assert torch.allclose(bank.mixture(x, w, selected_only=True), bank.mixture(x, w), rtol=1e-12)
