"""UnKD: popularity groups, within-group teacher lists, the pair law, the loss against a loop,
options, determinism, and that KD alone teaches the teacher's ranking."""

import math

import pytest
import torch

import kdfast
from kdfast.methods.unkd import popularity_groups, truncated_geometric
from tests.methods._helpers import train_kd_alone


def _setup(n_users=24, n_items=90, dt=12, seed=0):
    """Skewed popularity: users draw their items with weights ~ 1 / (rank + 1)."""
    g = torch.Generator().manual_seed(seed)
    tu, ti = torch.randn(n_users, dt, generator=g), torch.randn(n_items, dt, generator=g)
    w = 1.0 / torch.arange(1, n_items + 1).double()
    per_user = torch.randint(3, 9, (n_users,), generator=g)
    rows = [torch.multinomial(w, int(k), replacement=False, generator=g) for k in per_user]
    indptr = torch.zeros(n_users + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(per_user, 0)
    return tu, ti, (indptr, torch.cat(rows)), g


SMALL = dict(G=3, n=25, S=10, T=5.0)


def _observed(train, u):
    indptr, idx = train
    return set(idx[indptr[u] : indptr[u + 1]].tolist())


def test_popularity_groups_have_equal_mass():
    counts = torch.tensor([5, 0, 9, 1, 1, 3, 7, 0, 2, 2, 6, 4])
    items = torch.repeat_interleave(torch.arange(12), counts)
    groups = popularity_groups(items[torch.randperm(items.numel())], 12, 4)
    # loop reference: walk the items by descending count (ties to the lower id)
    order = sorted(range(12), key=lambda i: (-int(counts[i]), i))
    total, before, want = int(counts.sum()), 0, {}
    for i in order:
        want[i] = min(4 * before // total, 3)
        before += int(counts[i])
    assert groups.tolist() == [want[i] for i in range(12)]
    # popularity never increases with the group id, and each group's mass is about total / 4
    for a in range(12):
        for b in range(12):
            if groups[a] < groups[b]:
                assert counts[a] >= counts[b]
    mass = torch.zeros(4, dtype=torch.int64).index_add_(0, groups, counts)
    assert int(mass.sum()) == total and int((mass - total / 4).abs().max()) <= int(counts.max())
    assert groups[1] == 3 and groups[7] == 3  # never-seen items join the last group


def test_within_group_teacher_lists():
    tu, ti, train, g = _setup()
    m = kdfast.UnKD.build(tu, ti, train, 6, generator=g, **SMALL)
    scores = tu @ ti.T
    for u in range(24):
        obs = _observed(train, u)
        for grp in range(SMALL["G"]):
            cand = [i for i in range(90) if int(m.groups[i]) == grp and i not in obs]
            want = sorted(cand, key=lambda i: (-float(scores[u, i]), i))[: SMALL["n"]]
            got = [i for i in m.top[u, grp].tolist() if i >= 0]
            assert got == want and int(m.lengths[u, grp]) == len(want)
            assert all(x < 0 for x in m.top[u, grp].tolist()[len(want) :])


def test_pairs_respect_groups_order_and_counts():
    tu, ti, train, g = _setup()
    m = kdfast.UnKD.build(tu, ti, train, 6, generator=g, **SMALL)
    assert m.pair_group.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # S = 10 over G = 3: 4, 3, 3
    r1, r2 = m.pair_rank
    for u in range(24):
        for s in range(SMALL["S"]):
            grp = int(m.pair_group[s])
            L = int(m.lengths[u, grp])
            if L < 2:
                assert r1[u, s] == -1 and m.pos_items[u, s] == -1 and m.neg_items[u, s] == -1
                continue
            assert 0 <= r1[u, s] < r2[u, s] < L
            assert (
                m.pos_items[u, s] == m.top[u, grp, r1[u, s]]
                and m.neg_items[u, s] == m.top[u, grp, r2[u, s]]
            )
            assert int(m.groups[m.pos_items[u, s]]) == grp and int(
                m.pos_items[u, s]
            ) not in _observed(train, u)


def test_pair_law_chi_square():
    # P(min = a, max = b) = 2 p(a) p(b) / (1 - sum p^2) for a < b, p(r) ~ exp(-(r+1)/T) on 0..L-1
    T, L, rows = 3.0, 8, 40000
    m = kdfast.UnKD.__new__(kdfast.UnKD)
    torch.nn.Module.__init__(m)
    m.n_users, m.T, m.generator = rows, T, torch.Generator().manual_seed(5)
    m.lengths = torch.full((rows, 1), L)
    m.top = torch.arange(L, dtype=torch.int32).expand(rows, 1, L)
    m.pair_group = torch.zeros(1, dtype=torch.int64)
    m._resample()
    lo, hi = m.pair_rank[0][:, 0], m.pair_rank[1][:, 0]
    assert bool((lo < hi).all())
    p = torch.exp(-(torch.arange(L) + 1.0) / T)
    p = p / p.sum()
    joint = 2 * p[:, None] * p[None, :] / (1 - (p**2).sum())
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    counts = torch.zeros(L, L).index_put_((lo, hi), torch.ones(rows), accumulate=True)
    expect = rows * joint
    keep = mask & (expect >= 5)
    chi2 = float(((counts[keep] - expect[keep]) ** 2 / expect[keep]).sum())
    dof = int(keep.sum()) - 1
    # a very loose bound: the test only catches a wrong law
    assert chi2 < dof + 6 * math.sqrt(2 * dof)


def test_truncated_geometric_marginal():
    g = torch.Generator().manual_seed(2)
    L, q, n = 6, math.exp(-1 / 2.0), 30000
    r = truncated_geometric(torch.full((n,), L), q, 1, g).flatten()
    assert int(r.min()) >= 0 and int(r.max()) <= L - 1
    p = q ** torch.arange(L).double()
    expect = n * p / p.sum()
    counts = torch.bincount(r, minlength=L).double()
    assert float(((counts - expect) ** 2 / expect).sum()) < 25.0  # 5 dof


def test_loss_matches_loop_reference():
    tu, ti, train, g = _setup()
    m = kdfast.UnKD.build(tu, ti, train, 6, generator=g, lam=0.7, reduction="mean", **SMALL)
    su, si = torch.randn(24, 6, dtype=torch.float64), torch.randn(90, 6, dtype=torch.float64)
    users = torch.tensor([3, 5, 3, 7, 5])

    def per_user(u):
        vals = [
            -math.log(1 / (1 + math.exp(-float(su[u] @ (si[i] - si[j])))) + 1e-10)
            for i, j in zip(m.pos_items[u].tolist(), m.neg_items[u].tolist())
            if i >= 0
        ]
        return vals

    lists = [per_user(u) for u in (3, 5, 7)]
    mean = sum(sum(v) / len(v) for v in lists if v) / sum(1 for v in lists if v)
    assert m(su, si, users, users, users).item() == pytest.approx(0.7 * mean, rel=1e-9)
    m.reduction = "batch"
    assert m(su, si, users, users, users).item() == pytest.approx(0.7 * 5 * mean, rel=1e-9)
    m.reduction = "sum"
    assert m(su, si, users, users, users).item() == pytest.approx(
        0.7 * sum(sum(v) for v in lists), rel=1e-9
    )


def test_deterministic_with_seed():
    tu, ti, train, _ = _setup()
    runs = []
    for _ in range(2):
        m = kdfast.UnKD.build(tu, ti, train, 6, generator=torch.Generator().manual_seed(4), **SMALL)
        m.start_epoch(0, 3, None, None)
        runs.append((m.pos_items.clone(), m.neg_items.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    m.start_epoch(1, 3, None, None)
    assert not torch.equal(m.pos_items, runs[1][0])  # resampled every epoch


def test_kd_alone_increases_agreement_with_teacher():
    torch.manual_seed(0)
    tu, ti, train, g = _setup(n_users=30, n_items=120, dt=8, seed=1)
    m = kdfast.UnKD.build(
        tu, ti, train, 8, generator=g, G=2, n=40, S=40, T=10.0, lam=1.0, reduction="mean"
    )
    su = torch.nn.Parameter(torch.randn(30, 8) * 0.1)
    si = torch.nn.Parameter(torch.randn(120, 8) * 0.1)
    scores_t = tu @ ti.T

    def agreement():  # mean Kendall-like agreement on each user's within-group teacher top 20
        with torch.no_grad():
            s = su @ si.T
        agree = total = 0
        for u in range(30):
            for grp in range(2):
                ids = [i for i in m.top[u, grp, :20].tolist() if i >= 0]
                a, b = s[u, ids], scores_t[u, ids]
                sa, sb = torch.sign(a[:, None] - a[None, :]), torch.sign(b[:, None] - b[None, :])
                agree += float((sa == sb).float().triu(1).sum())
                total += len(ids) * (len(ids) - 1) / 2
        return agree / total

    before = agreement()
    users = torch.arange(30)
    train_kd_alone(m, su, si, users, users, users)
    assert agreement() > before + 0.15


def test_default_reduction_is_batch():
    tu, ti, train, g = _setup()
    assert kdfast.UnKD.build(tu, ti, train, 6, generator=g, **SMALL).reduction == "batch"


def test_bad_options():
    tu, ti, train, g = _setup()
    for bad, match in (
        ({"G": 0}, "G"),
        ({"n": 0}, "n"),
        ({"S": 0}, "S"),
        ({"T": 0.0}, "T"),
        ({"T": math.inf}, "T"),
        ({"lam": 0}, "lam"),
        ({"reduction": "none"}, "reduction"),
        ({"G": 2.5}, "G"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            kdfast.UnKD.build(tu, ti, train, 6, **{**SMALL, **bad})
