"""HetComp: the ensemble lists, pi_o, the DKC distance and rule, both phases' losses against dense
formulas, trajectories on disk, the trainer hook, errors, and that the loss alone teaches the
ranking."""

import math

import pytest
import torch

import kdfast
from kdfast.methods.hetcomp import (
    HetComp,
    ensemble_top,
    load_trajectories,
    observed_order,
    save_trajectories,
    top_ndcg,
)


def _train(n_users, n_items, per_user, g):
    items = torch.cat([torch.randperm(n_items, generator=g)[:per_user] for _ in range(n_users)])
    return torch.arange(0, per_user * n_users + 1, per_user), items


def _teachers(n_users, n_items, g, n_teachers=2, n_ckpt=3, d=8):
    out = []
    for x in range(n_teachers):
        final_u, final_i = (
            torch.randn(n_users, d, generator=g),
            torch.randn(n_items, d, generator=g),
        )
        ck = []
        for v in range(n_ckpt):  # checkpoints drift towards the final one
            a = (v + 1) / n_ckpt
            ck.append(
                (
                    a * final_u + (1 - a) * torch.randn(n_users, d, generator=g),
                    a * final_i + (1 - a) * torch.randn(n_items, d, generator=g),
                )
            )
        out.append({"name": f"t{x}", "checkpoints": ck})
    return out


def test_ensemble_top_matches_dense_sum():
    g = torch.Generator().manual_seed(0)
    n_users, n_items, K = 7, 40, 6
    tops = [
        torch.stack([torch.randperm(n_items, generator=g)[:K] for _ in range(n_users)])
        for _ in range(3)
    ]
    tops[1][2, 4:] = -1  # padding
    got = ensemble_top(tops, K, n_items, 10.0)
    dense = torch.zeros(n_users, n_items, dtype=torch.float64)
    for t in tops:
        for u in range(n_users):
            for r, i in enumerate(t[u].tolist()):
                if i >= 0:
                    dense[u, i] += math.exp(-r / 10.0)
    for u in range(n_users):
        cand = [i for i in range(n_items) if dense[u, i] > 0]
        want = sorted(cand, key=lambda i: (-dense[u, i].item(), i))[:K]
        assert got[u].tolist() == want


def test_ensemble_top_pads_when_too_few_ids():
    tops = [torch.tensor([[3, 1, -1]]), torch.tensor([[1, -1, -1]])]
    assert ensemble_top(tops, 4, 5, 10.0).tolist() == [[1, 3, -1, -1]]


def test_observed_order_matches_loop():
    g = torch.Generator().manual_seed(1)
    n_users, n_items = 6, 30
    counts = torch.tensor([1, 4, 7, 2, 5, 3])
    indptr = torch.zeros(n_users + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    items = torch.cat([torch.randperm(n_items, generator=g)[:c] for c in counts.tolist()])
    scores = [torch.randn(items.numel(), generator=g) for _ in range(2)]
    scores[1][2] = scores[1][3]  # a tie inside user 1
    got = observed_order((indptr, items), scores, 4, 10.0)
    for u in range(n_users):
        ids = items[indptr[u] : indptr[u + 1]].tolist()
        tot = {i: 0.0 for i in ids}
        for s in scores:
            sc = s[indptr[u] : indptr[u + 1]].tolist()
            ranked = sorted(range(len(ids)), key=lambda j: (-sc[j], ids[j]))
            for r, j in enumerate(ranked):
                tot[ids[j]] += math.exp(-r / 10.0)
        want = sorted(ids, key=lambda i: (-tot[i], i))[:4]
        assert got[u].tolist() == want + [-1] * (4 - len(want))


def test_top_ndcg_matches_loop():
    g = torch.Generator().manual_seed(2)
    s = torch.stack([torch.randperm(30, generator=g)[:12] for _ in range(5)])
    t = torch.stack([torch.randperm(30, generator=g)[:12] for _ in range(5)])
    t[0] = s[0]
    got = top_ndcg(s, t, k=10)
    for u in range(5):
        tset = set(t[u, :10].tolist())
        gains = [(2 ** math.exp(-p / 10) - 1) / math.log2(p + 2) for p in range(10)]
        dcg = sum(gn for p, gn in enumerate(gains) if s[u, p].item() in tset)
        assert got[u].item() == pytest.approx(dcg / sum(gains), rel=1e-12)
    assert got[0].item() == pytest.approx(1.0)


def _dense_losses(m, su, si, ub):
    """Phase-1 and phase-2 losses from the full score matrix, written directly from the formulas."""
    S = (su[ub].double() @ si.double().T).clamp(-m.opts["clamp"], m.opts["clamp"]).numpy()
    indptr, items = m.excl
    l1 = l2 = 0.0
    for b, u in enumerate(ub.tolist()):
        obs = set(items[indptr[u] : indptr[u + 1]].tolist())
        pi_o = [i for i in m.pi_o[u].tolist() if i >= 0]
        pi_t = m.pi_t[u].tolist()
        unobs = [j for j in range(si.shape[0]) if j not in obs]
        E = sum(math.exp(S[b, j]) for j in unobs if j not in set(pi_t))
        l1 -= sum(S[b, i] - math.log(math.exp(S[b, i]) + E) for i in pi_o + pi_t)

        def listmle(lst, n, b=b, unobs=unobs, pi_t=pi_t):  # this user's row, tail and list
            C = sum(math.exp(S[b, j]) for j in unobs if j not in set(pi_t[:n]))
            return -sum(
                S[b, lst[k]] - math.log(sum(math.exp(S[b, j]) for j in lst[k:]) + C)
                for k in range(len(lst))
            )

        l2 += listmle(pi_o, 50) + 0.5 * (listmle(pi_t[:50], 50) + listmle(pi_t[:10], 10))
    return m.opts["lam1"] * l1, m.opts["lam2"] * l2


def _small_method(**opts):
    g = torch.Generator().manual_seed(3)
    n_users, n_items = 9, 120
    train = _train(n_users, n_items, 5, g)
    teachers = _teachers(n_users, n_items, g)
    tu, ti = teachers[0]["checkpoints"][-1]
    m = HetComp.build(
        tu, ti, train, 4, generator=g, trajectories=teachers, K=60, n_observed=3, dcg_k=20, **opts
    )
    su = torch.nn.Parameter(torch.randn(n_users, 4, generator=g))
    si = torch.nn.Parameter(torch.randn(n_items, 4, generator=g))
    return m, su, si, g


def _dense_torch(m, su, si, ub, phase):
    """The phase's loss from the full float64 score matrix with torch ops (autograd's gradients)."""
    S = (su[ub] @ si.T).clamp(-m.opts["clamp"], m.opts["clamp"])
    indptr, items = m.excl
    total = S.new_zeros(())
    for b, u in enumerate(ub.tolist()):
        unobs = torch.ones(si.shape[0], dtype=torch.bool)
        unobs[items[indptr[u] : indptr[u + 1]]] = False
        pi_o = torch.tensor([i for i in m.pi_o[u].tolist() if i >= 0], dtype=torch.int64)
        pi_t = m.pi_t[u]

        def tail(n, unobs=unobs, pi_t=pi_t, b=b):  # this user's unobserved items and list
            keep = unobs.clone()
            keep[pi_t[:n]] = False
            return torch.exp(S[b][keep]).sum()

        if phase == 1:
            pos = torch.cat([pi_o, pi_t])
            total = total - (S[b, pos] - torch.log(torch.exp(S[b, pos]) + tail(pi_t.numel()))).sum()
        else:

            def listmle(lst, n, b=b, tail=tail):
                s = S[b, lst]
                below = torch.flip(torch.cumsum(torch.flip(torch.exp(s), [0]), 0), [0])
                return -(s - torch.log(below + tail(n))).sum()

            total = (
                total + listmle(pi_o, 50) + 0.5 * (listmle(pi_t[:50], 50) + listmle(pi_t[:10], 10))
            )
    return (m.opts["lam1"] if phase == 1 else m.opts["lam2"]) * total


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("phase", [1, 2])
def test_losses_match_dense_formulas_with_gradient(phase, backend):
    if not kdfast.backends()[backend][0]:
        pytest.skip(f"backend {backend} not available here")
    m, su, si, _ = _small_method(backend=backend)
    m.phase = phase
    ub = torch.tensor([0, 2, 3, 8])
    loss = m.loss_for_users(su, si, ub)
    want = _dense_losses(m, su.detach(), si.detach(), ub)[phase - 1]
    assert loss.item() == pytest.approx(want, rel=1e-4)
    # float64 tables: the fused tails and gathers agree with the formula to rounding
    if backend != "triton":
        assert m.loss_for_users(
            su.detach().double(), si.detach().double(), ub
        ).item() == pytest.approx(want, rel=1e-10)
    loss.backward()
    # gradients against autograd through the dense float64 formula
    su2, si2 = su.detach().double().requires_grad_(), si.detach().double().requires_grad_()
    ref = _dense_torch(m, su2, si2, ub, phase)
    assert ref.item() == pytest.approx(want, rel=1e-10)
    ref.backward()
    assert torch.allclose(su.grad.double(), su2.grad, rtol=1e-3, atol=1e-5)
    assert torch.allclose(si.grad.double(), si2.grad, rtol=1e-3, atol=1e-5)
    assert si.grad.abs().sum() > 0


def test_clamp_bounds_scores():
    m, su, si, _ = _small_method(clamp=0.5)
    with torch.no_grad():
        su.mul_(50)
    loss = m.loss_for_users(su, si, torch.arange(9))
    assert bool(torch.isfinite(loss))
    assert loss.item() == pytest.approx(
        _dense_losses(m, su.detach(), si.detach(), torch.arange(9))[0], rel=1e-4
    )


def test_dkc_follows_the_rule():
    m, su, si, _ = _small_method(period=2, start=2, alpha=1.05, decay=0.995)
    assert m.phase == 1 and bool((m.selected == 0).all())
    final = m.final
    m.start_epoch(1, 10, su.detach(), si.detach())  # not a DKC epoch
    assert m.dkc_calls == 0
    m.start_epoch(2, 10, su.detach(), si.detach())  # first call: records distances only
    assert m.dkc_calls == 1 and bool((m.selected == 0).all())
    _, stop = kdfast.topk_scores(su.detach(), si.detach(), 20, exclude=m.excl)
    lists = m.knowledge  # per teacher [V, U, K]

    def dist(x, u, v):
        return (
            1.0 - top_ndcg(stop[u : u + 1], lists[x][min(v, int(final[x]))][u : u + 1], 20).item()
        )

    last = {(x, u): dist(x, u, 1) for x in range(2) for u in range(9)}
    assert torch.allclose(
        m.last_dist,
        torch.tensor([[last[x, u] for u in range(9)] for x in range(2)], dtype=torch.float64),
    )
    with torch.no_grad():  # move the student so that the distances change
        su.add_(torch.randn_like(su))
    _, stop = kdfast.topk_scores(su.detach(), si.detach(), 20, exclude=m.excl)
    m.start_epoch(4, 10, su.detach(), si.detach())
    th = 1.05 * 0.995**2
    for x in range(2):
        for u in range(9):
            nxt = dist(x, u, 1)
            r = last[x, u] / nxt if nxt else (math.inf if last[x, u] else math.nan)
            moved = r > th or r < 1
            assert m.selected[x, u].item() == (1 if moved else 0)
            assert m.last_dist[x, u].item() == pytest.approx(dist(x, u, 2) if moved else last[x, u])
    want = ensemble_top([lists[x][m.selected[x], torch.arange(9)] for x in range(2)], 60, 120, 10.0)
    assert torch.equal(m.pi_t, want)


def test_dkc_delay_runs_dkc_one_epoch_later_as_the_authors():
    # start_epoch(e) comes after e completed epochs: kdfast's DKC after 2, 4, ...; dkc_delay=1
    # after 3, 5, ... (the authors' loop)
    calls = {}
    for delay in (0, 1):
        m, su, si, _ = _small_method(period=2, start=2, dkc_delay=delay)
        calls[delay] = []
        for epoch in range(7):
            before = m.dkc_calls
            m.start_epoch(epoch, 10, su.detach(), si.detach())
            if m.dkc_calls > before:
                calls[delay].append(epoch)
    assert calls[0] == [2, 4, 6] and calls[1] == [3, 5]


def test_ndcg_decimals_rounds_the_dkc_distances():
    m, su, si, _ = _small_method(period=2, start=2, ndcg_decimals=4)
    m.start_epoch(2, 10, su.detach(), si.detach())
    _, stop = kdfast.topk_scores(su.detach(), si.detach(), 20, exclude=m.excl)
    lists, changed = m.knowledge, False
    for x in range(2):
        exact = top_ndcg(stop, lists[x][min(1, int(m.final[x]))], 20)
        rounded = torch.round(exact, decimals=4)
        torch.testing.assert_close(m.last_dist[x], 1.0 - rounded, rtol=0, atol=1e-15)
        changed |= not torch.equal(rounded, exact)
    assert changed  # the case is one where rounding matters


def test_phase_two_once_all_final():
    m, su, si, _ = _small_method()
    m.selected = m.final[:, None].expand_as(m.selected).clone()
    m._update_phase()
    assert m.phase == 2
    m.start_epoch(10, 20, su.detach(), si.detach())  # no DKC in phase 2
    assert m.dkc_calls == 0


def test_single_teacher_default_is_phase_two():
    g = torch.Generator().manual_seed(4)
    train = _train(6, 80, 3, g)
    m = kdfast.HetComp.build(
        torch.randn(6, 5, generator=g), torch.randn(80, 5, generator=g), train, 3, K=50
    )
    assert m.phase == 2 and m.pi_t.shape == (6, 50) and m.pi_o.shape == (6, 10)
    assert not m.uses_base_loss


def test_trajectories_roundtrip_and_split_check(tmp_path):
    g = torch.Generator().manual_seed(5)
    n_users, n_items = 5, 70
    train = _train(n_users, n_items, 3, g)
    teachers = _teachers(n_users, n_items, g, n_teachers=2, n_ckpt=2)
    path = tmp_path / "traj.pt"
    save_trajectories(
        path, teachers, train=train, n_users=n_users, n_items=n_items, meta={"note": "x"}
    )
    back = load_trajectories(path, train=train, n_users=n_users, n_items=n_items)
    assert [t["name"] for t in back] == ["t0", "t1"]
    for a, b in zip(teachers, back):
        for (u1, i1), (u2, i2) in zip(a["checkpoints"], b["checkpoints"]):
            assert torch.equal(u1, u2) and torch.equal(i1, i2)
    other = _train(n_users, n_items, 3, g)
    with pytest.raises(ValueError, match="another training split"):
        load_trajectories(path, train=other, n_users=n_users, n_items=n_items)
    m = HetComp.build(
        teachers[0]["checkpoints"][-1][0],
        teachers[0]["checkpoints"][-1][1],
        train,
        3,
        trajectories=str(path),
        K=50,
    )
    assert len(m.knowledge) == 2 and m.phase == 1
    # several files: their teachers pooled in order
    path2 = tmp_path / "traj2.pt"
    save_trajectories(path2, teachers[:1], train=train, n_users=n_users, n_items=n_items)
    u, i = teachers[0]["checkpoints"][-1]
    m2 = HetComp.build(u, i, train, 3, trajectories=[str(path), str(path2)], K=50)
    assert m2.names == ["t0", "t1", "t0"]
    for a, b in zip(m2.knowledge, [m.knowledge[0], m.knowledge[1], m.knowledge[0]]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_trainer_uses_hetcomp_loss_alone():
    from kdfast import data as kd
    from kdfast.models import BPRMF
    from kdfast.train import Trainer

    ds = kd.synthetic(60, 90, seed=0)
    split = kd.make_split(ds, "full", seed=0)
    g = torch.Generator().manual_seed(0)
    teacher = BPRMF(split.n_users, split.n_items, 8, generator=g)
    tu, ti = (t.detach() for t in teacher.embeddings())
    seen = []

    class Spy(HetComp):
        def forward(self, *a):
            out = super().forward(*a)
            seen.append(out.item())
            return out

    m = Spy.build(
        tu, ti, split.train, 4, K=50, max_users=8, generator=torch.Generator().manual_seed(1)
    )
    tr = Trainer(
        BPRMF(split.n_users, split.n_items, 4, generator=g),
        split,
        method=m,
        epochs=1,
        progress=False,
        log=None,
        batch_size=512,
    )
    res = tr.fit()
    assert seen and res["history"][0]["loss"] == pytest.approx(sum(seen), rel=1e-5)


def test_max_users_caps_the_batch():
    m, su, si, _ = _small_method(max_users=2)
    calls = []
    orig = m.loss_for_users
    m.loss_for_users = lambda a, b, ub: calls.append(ub) or orig(a, b, ub)
    m(su, si, torch.arange(9), torch.zeros(9, dtype=torch.int64), torch.zeros(9, dtype=torch.int64))
    assert calls[0].numel() == 2 and len(set(calls[0].tolist())) == 2


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"K": 20}, "K must be >= 50"),
        ({"K": 60, "dcg_k": 80}, "dcg_k"),
        ({"lam1": 0}, "lam1"),
        ({"T_imp": -1}, "T_imp"),
        ({"start": -1}, "start"),
        ({"max_users": 0}, "max_users"),
        ({"period": 0}, "period"),
        ({"trajectories": []}, "non-empty list"),
        (
            {"trajectories": [{"checkpoints": [(torch.zeros(3, 2), torch.zeros(70, 2))]}]},
            "do not match",
        ),
    ],
)
def test_bad_options(opts, match):
    g = torch.Generator().manual_seed(6)
    train = _train(5, 70, 3, g)
    with pytest.raises(ValueError, match=match):
        HetComp.build(torch.randn(5, 4), torch.randn(70, 4), train, 3, **opts)


def test_loss_alone_teaches_the_ensemble_ranking():
    g = torch.Generator().manual_seed(7)
    n_users, n_items = 20, 150
    train = _train(n_users, n_items, 4, g)
    teachers = _teachers(n_users, n_items, g, n_teachers=2, n_ckpt=1, d=6)
    m = HetComp.build(
        *teachers[0]["checkpoints"][0], train, 6, trajectories=teachers, K=50, generator=g
    )
    su = torch.nn.Parameter(0.1 * torch.randn(n_users, 6, generator=g))
    si = torch.nn.Parameter(0.1 * torch.randn(n_items, 6, generator=g))

    def overlap():
        _, top = kdfast.topk_scores(su.detach(), si.detach(), 10, exclude=m.excl)
        return sum(
            len(set(top[u].tolist()) & set(m.pi_t[u, :10].tolist())) for u in range(n_users)
        ) / (10 * n_users)

    before = overlap()
    opt = torch.optim.Adam([su, si], lr=0.05)
    users = torch.arange(n_users)
    for _ in range(60):
        opt.zero_grad()
        m(su, si, users, users, users).backward()
        opt.step()
    after = overlap()
    assert after > before + 0.3, (before, after)


def test_status_reports_phase_and_selection():
    m, su, si, _ = _small_method(period=2, start=2)
    assert m.status() == "phase 1, DKC calls 0, mean checkpoint t0 0.00/2, t1 0.00/2"
    m.selected[0] = 2
    m.selected[1, :3] = 1
    assert "t0 2.00/2, t1 0.33/2" in m.status()


def test_scorer_teacher_knowledge_equals_tables(tmp_path):
    """A teacher given as precomputed knowledge (scorer_knowledge of a pair scorer, as for NeuMF)
    builds the HetComp of the same teacher given as tables; files keep it; K must fit."""
    from kdfast.methods.hetcomp import checkpoint_knowledge, scorer_knowledge

    g = torch.Generator().manual_seed(9)
    n_users, n_items = 6, 80
    indptr, items = _train(n_users, n_items, 4, g)
    train = (indptr, items.view(n_users, 4).sort(1).values.flatten())  # rows ascending: canonical
    teachers = _teachers(n_users, n_items, g, n_teachers=2, n_ckpt=2)
    for t in teachers:  # integer tables: every score exact, whichever way it is summed
        t["checkpoints"] = [(u.round(), i.round()) for u, i in t["checkpoints"]]
    as_scorer = dict(teachers[1])
    knowledge = []
    for u, i in teachers[1]["checkpoints"]:
        know = scorer_knowledge(lambda a, b, u=u, i=i: u[a] @ i[b].T, n_users, n_items, train, 60)
        ref = checkpoint_knowledge(u, i, train, 60)
        assert torch.equal(know[0], ref[0]) and torch.equal(know[1], ref[1])
        knowledge.append(know)
    del as_scorer["checkpoints"]
    as_scorer["knowledge"] = knowledge
    u, i = teachers[0]["checkpoints"][-1]
    tables = HetComp.build(u, i, train, 3, trajectories=teachers, K=50)
    mixed = HetComp.build(u, i, train, 3, trajectories=[teachers[0], as_scorer], K=50)
    for a, b in zip(tables.knowledge, mixed.knowledge):
        assert torch.equal(a, b)
    assert torch.equal(tables.pi_o, mixed.pi_o)
    path = tmp_path / "mixed.pt"
    save_trajectories(path, [teachers[0], as_scorer], train=train, n_users=n_users, n_items=n_items)
    back = load_trajectories(path, train=train, n_users=n_users, n_items=n_items)
    assert "knowledge" in back[1] and "checkpoints" not in back[1]
    from_file = HetComp.build(u, i, train, 3, trajectories=str(path), K=50)
    for a, b in zip(tables.knowledge, from_file.knowledge):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fewer than K = 70"):
        HetComp.build(u, i, train, 3, trajectories=[as_scorer], K=70)
    bad = dict(as_scorer, knowledge=[(knowledge[0][0] + n_items, knowledge[0][1])])
    with pytest.raises(ValueError, match="outside -1"):
        HetComp.build(u, i, train, 3, trajectories=[bad], K=50)
