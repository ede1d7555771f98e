"""PHR against a direct re-computation of docs/METHODS.md section 3."""

import pytest
import torch
from torch import nn

import kdfast
from tests.methods._helpers import entity_setup


def _setup(seed=0):
    return entity_setup(seed=seed)


def test_phr_matches_direct_formula_and_pnet_is_replaceable():
    tu, ti, su, si, users, pos, neg = _setup(seed=8)
    m = kdfast.PHR.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(9))
    assert m.pnet.net[0].out_features == 12 + 4 * 12 and m.pnet.net[2].out_features == 4 * 12
    got = m(su, si, users, pos, neg)

    def loss_of(t, s, ids):
        w = m.pnet(t[ids]).view(-1, 12, 4)
        return ((t[ids] - torch.einsum("bts,bs->bt", w, s[ids])) ** 2).sum()

    want = 0.01 * (
        loss_of(tu, su, users.unique())
        + 0.5 * (loss_of(ti, si, pos.unique()) + loss_of(ti, si, neg.unique()))
    )
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
