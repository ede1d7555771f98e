"""kdfast.models (BPR-MF, LightGCN, saved teachers) and kdfast.metrics against hand-computed
cases."""

import math

import pytest
import torch

from kdfast import data as kd
from kdfast import metrics
from kdfast._core.csr import concat_rows, select_rows
from kdfast.models import (
    BPRMF,
    LightGCN,
    build_model,
    load_teacher,
    normalized_adjacency,
    save_teacher,
)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")


def csr(rows):
    indptr = torch.tensor(
        [0] + [sum(len(r) for r in rows[: i + 1]) for i in range(len(rows))], dtype=torch.int64
    )
    return indptr, torch.tensor([x for r in rows for x in r], dtype=torch.int64)


# ---------------------------------------------------------------- models
def test_bprmf_init_and_args():
    m = BPRMF(50, 70, 9, generator=torch.Generator().manual_seed(0))
    u, i = m.embeddings()
    assert u.shape == (50, 9) and i.shape == (70, 9) and u.requires_grad
    assert 0.007 < float(torch.cat([u.flatten(), i.flatten()]).detach().std()) < 0.013
    m2 = BPRMF(50, 70, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m2.embeddings()[0], u)
    for bad in ((0, 5, 3), (5, 5, 0), (5, 5, 2.5)):
        with pytest.raises(ValueError):
            BPRMF(*bad)
    with pytest.raises(ValueError, match="model"):
        build_model("ncf", 3, 3, 2, None)


def test_lightgcn_matches_dense_propagation():
    train = csr([[0, 2], [1], [2, 3], []])
    n_u, n_i = 4, 5
    m = LightGCN(n_u, n_i, 3, train, n_layers=2, generator=torch.Generator().manual_seed(1))
    a = torch.zeros(n_u + n_i, n_u + n_i, dtype=torch.float64)
    for u, row in enumerate([[0, 2], [1], [2, 3], []]):
        for i in row:
            a[u, n_u + i] = a[n_u + i, u] = 1.0
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    a_hat = inv[:, None] * a * inv[None, :]
    assert torch.allclose(
        normalized_adjacency(train, n_u, n_i).to_dense().double(), a_hat, atol=1e-7
    )
    e0 = torch.cat([m.base.user.weight, m.base.item.weight]).detach().double()
    want = (e0 + a_hat @ e0 + a_hat @ a_hat @ e0) / 3
    u, i = m.embeddings()
    assert torch.allclose(torch.cat([u, i]).double(), want, atol=1e-6)
    (u.sum() + i.pow(2).sum()).backward()
    assert m.base.user.weight.grad is not None and torch.isfinite(m.base.item.weight.grad).all()
    m0 = LightGCN(n_u, n_i, 3, train, n_layers=0)
    assert torch.equal(m0.embeddings()[0], m0.base.user.weight)


def test_teacher_roundtrip_and_mismatch(tmp_path):
    u, i = torch.randn(6, 4), torch.randn(8, 4)
    meta = {
        "data_fingerprint": "abc",
        "protocol": "loo",
        "split_seed": 0,
        "dim": 4,
        "model": "bprmf",
    }
    path = tmp_path / "t" / "teacher.pt"
    save_teacher(path, u, i, meta)
    u2, i2, meta2 = load_teacher(path, expect={"data_fingerprint": "abc", "dim": 4})
    assert torch.equal(u, u2) and torch.equal(i, i2) and meta2 == meta
    with pytest.raises(ValueError, match="protocol is 'loo', this run needs 'full'"):
        load_teacher(path, expect={"protocol": "full"})
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a kdfast teacher"):
        load_teacher(tmp_path / "other.pt")


# ---------------------------------------------------------------- leave-one-out metrics
def test_loo_metrics_hand_computed():
    ranks = torch.tensor([0, 1, 9, 10, 499])
    m = metrics.loo_metrics(ranks, ns=(1, 10))
    assert m["HR@1"] == pytest.approx(1 / 5)
    assert m["HR@10"] == pytest.approx(3 / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 10) / 5)
    assert m["NDCG@1"] == m["MRR@1"] == pytest.approx(1 / 5)


def test_loo_ranks_ties_are_pessimistic():
    user = torch.tensor([[1.0, 0.0]])
    item = torch.tensor([[2.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 5.0]])
    cands = torch.tensor([[0, 1, 2, 3, 4], [3, 0, 1, 2, 4]])
    r = metrics.loo_ranks(torch.cat([user, user]), item, torch.tensor([0, 1]), cands, batch=1)
    # held-out 0 scores 2: beaten by item 1 (3) and tied with items 2 and 4 -> rank 3; item 3 scores
    # 1: last
    assert r.tolist() == [3, 4]


# ---------------------------------------------------------------- full-ranking metrics
def test_full_metrics_hand_computed():
    top = torch.tensor([[3, 1, 2], [4, 0, -1]])
    truth = csr([[1, 5], [4, 0, 2, 3]])
    m = metrics.full_metrics(top, truth, n_items=6, ks=(1, 3))
    d = [1 / math.log2(p + 2) for p in range(3)]
    assert m["Recall@3"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["Precision@3"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["NDCG@3"] == pytest.approx((d[1] / (d[0] + d[1]) + (d[0] + d[1]) / sum(d)) / 2)
    assert m["Recall@1"] == pytest.approx((0 + 1 / 4) / 2) and m["NDCG@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="exceed"):
        metrics.full_metrics(top, truth, 6, ks=(5,))


def test_csr_helpers():
    a = csr([[1, 2], [], [0]])
    b = csr([[5], [3, 4], []])
    assert select_rows(*a, torch.tensor([2, 0, 2]))[1].tolist() == [0, 1, 2, 0]
    indptr, ids = concat_rows(a, b)
    assert indptr.tolist() == [0, 3, 5, 6] and ids.tolist() == [1, 2, 5, 3, 4, 0]


def brute_force(user, item, split, part, valid_excludes_test=False):
    """Dense reference for tiny cases (metrics.evaluate itself never builds users x items)."""
    scores = user @ item.T
    if split.protocol == "loo":
        cands = split.valid_candidates if part == "valid" else split.test_candidates
        s = scores[split.eval_users[:, None], cands]
        return metrics.loo_metrics((s[:, 1:] >= s[:, :1]).sum(1))
    truth = split.valid if part == "valid" else split.test
    excl = [split.train] + ([split.valid] if part == "test" else [])
    if part == "valid" and valid_excludes_test:
        excl.append(split.test)
    for indptr, ids in excl:
        rows = torch.repeat_interleave(torch.arange(split.n_users), indptr[1:] - indptr[:-1])
        scores[rows, ids] = -math.inf
    users = torch.nonzero(truth[0][1:] > truth[0][:-1]).flatten()
    order = torch.sort(-scores[users], dim=1, stable=True).indices[:, :50]
    return metrics.full_metrics(order, select_rows(*truth, users), split.n_items)


@pytest.mark.parametrize("protocol", ["loo", "full"])
def test_evaluate_matches_dense_brute_force(protocol):
    d = kd.synthetic(60, 120, seed=5)
    s = kd.make_split(d, protocol, seed=1, n_neg=30)
    g = torch.Generator().manual_seed(0)
    user, item = torch.randn(d.n_users, 6, generator=g), torch.randn(d.n_items, 6, generator=g)
    for part in ("valid", "test"):
        got = metrics.evaluate(user, item, s, part)
        want = brute_force(user, item, s, part)
        assert got.keys() == want.keys()
        for k in got:
            assert got[k] == pytest.approx(want[k], abs=1e-12), k
    with pytest.raises(ValueError, match="part"):
        metrics.evaluate(user, item, s, "train")


def test_validation_excluding_test_items_is_the_authors_protocol():
    # valid_excludes_test ranks validation items with the test items excluded too (the authors'
    # code); the test part is unchanged, and on this split the option changes validation numbers
    d = kd.synthetic(60, 120, seed=5)
    s = kd.make_split(d, "full", seed=1)
    g = torch.Generator().manual_seed(0)
    user, item = torch.randn(d.n_users, 6, generator=g), torch.randn(d.n_items, 6, generator=g)
    got = metrics.evaluate(user, item, s, "valid", valid_excludes_test=True)
    want = brute_force(user, item, s, "valid", valid_excludes_test=True)
    assert got == pytest.approx(want, abs=1e-12)
    assert got != pytest.approx(metrics.evaluate(user, item, s, "valid"), abs=1e-12)
    test = metrics.evaluate(user, item, s, "test", valid_excludes_test=True)
    assert test == metrics.evaluate(user, item, s, "test")


def test_full_evaluation_never_recommends_training_items():
    d = kd.synthetic(40, 80, seed=2)
    s = kd.make_split(d, "full", seed=0)
    users = torch.arange(d.n_users)
    top = metrics.full_topk(
        torch.randn(d.n_users, 4), torch.randn(d.n_items, 4), users, s.train, 20, batch=7
    )
    for u in range(d.n_users):
        train_items = set(s.train[1][s.train[0][u] : s.train[0][u + 1]].tolist())
        assert not train_items & set(top[u].tolist())
