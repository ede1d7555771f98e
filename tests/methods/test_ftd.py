"""FTD against a direct N x N re-computation of docs/METHODS.md section 4."""

import pytest
import torch

import kdfast
from tests.conftest import backend_params
from tests.methods._helpers import batch_rows, cos_matrix, entity_setup


def _setup(seed=0):
    return entity_setup(d_t=10, d_s=4, n_u=25, n_i=40, seed=seed, b=24, dtype=torch.float64)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_ftd_matches_direct_formula(backend):
    tu, ti, su, si, users, pos, neg = _setup()
    m = kdfast.FTD.build(tu, ti, None, 4, backend=backend)
    got = m(su, si, users, pos, neg)
    got.backward()
    g_u, g_i = su.grad.clone(), si.grad.clone()
    su.grad = si.grad = None
    t, s, _, _ = batch_rows(tu, ti, su, si, users, pos, neg)
    want = 0.001 * ((cos_matrix(t, t) - cos_matrix(s, s)) ** 2).sum()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_u, su.grad)
    torch.testing.assert_close(g_i, si.grad)
    assert list(m.parameters()) == []
