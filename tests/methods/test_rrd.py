"""RRD: the teacher list and its samples, the no-sampling variant against the full-catalog op,
option errors, and that KD alone teaches the ranking."""

import pytest
import torch

import kdfast
from tests.methods._helpers import teacher_setup as _setup
from tests.methods._helpers import top_overlap, train_kd_alone

SMALL = dict(N=20, K=8, L=8, T=5.0)


def test_samples_respect_teacher_list_and_exclusions():
    tu, ti, train, g = _setup()
    m = kdfast.RRD.build(tu, ti, train, 6, generator=g, **SMALL)
    side = m.user_side
    scores = tu @ ti.T
    indptr, idx = train
    for u in range(24):
        observed = set(idx[indptr[u] : indptr[u + 1]].tolist())
        top = side.top[u].tolist()
        assert not (observed & set(top))
        # teacher order: scores along the list never increase
        assert bool((scores[u, side.top[u]][1:] <= scores[u, side.top[u]][:-1]).all())
        inter = side.interesting[u].tolist()
        assert [top.index(i) for i in inter] == sorted(top.index(i) for i in inter)
        un = set(side.uninteresting[u].tolist())
        assert len(un) == SMALL["L"] and not (un & observed) and not (un & set(top))


def test_no_sampling_uses_first_k_and_full_tail():
    tu, ti, train, g = _setup()
    m = kdfast.RRD.build(tu, ti, train, 6, generator=g, sampling=False, **SMALL)
    su, si = torch.randn(24, 6, dtype=torch.float64), torch.randn(90, 6, dtype=torch.float64)
    users = torch.tensor([3, 3, 5])
    got = m(su, si, users, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    ub = torch.tensor([3, 5])
    # rows 3 and 5
    exclude = (torch.tensor([0, 4, 8]), torch.cat([train[1][12:16], train[1][20:24]]))
    want = kdfast.full_catalog_listwise_loss(
        su[ub], si, m.user_side.top[ub, : SMALL["K"]], exclude=exclude, backend="torch"
    )
    torch.testing.assert_close(got, 1e-3 * want)


def test_kd_alone_increases_agreement_with_teacher():
    torch.manual_seed(0)
    tu, ti, train, g = _setup(n_users=30, n_items=120, dt=8, seed=1)
    m = kdfast.RRD.build(tu, ti, train, 8, generator=g, N=20, K=10, L=20, T=5.0, lam=1.0)
    su = torch.nn.Parameter(torch.randn(30, 8) * 0.1)
    si = torch.nn.Parameter(torch.randn(120, 8) * 0.1)
    top10 = m.user_side.top[:, :10]

    before = top_overlap(su, si, top10, train)
    users = torch.arange(30)
    train_kd_alone(m, su, si, users, users % 120, users % 120)
    assert top_overlap(su, si, top10, train) > before + 0.2


def test_bad_options():
    tu, ti, train, g = _setup()
    with pytest.raises(ValueError, match="N"):
        kdfast.RRD.build(tu, ti, train, 6, N=5, K=8)
    with pytest.raises(ValueError, match="T"):
        kdfast.RRD.build(tu, ti, train, 6, N=20, K=8, T=0.0)
    with pytest.raises(ValueError, match="available|N = "):
        kdfast.RRD.build(tu, ti, train, 6, N=88, K=8)
    with pytest.raises(ValueError, match="size|available"):
        kdfast.RRD.build(tu, ti, train, 6, N=20, K=8, L=80)
