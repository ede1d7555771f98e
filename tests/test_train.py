"""kdfast.train: negatives, the BPR loss, learning, determinism, early stopping and the KD hook
interface."""

import pytest
import torch
import torch.nn.functional as F

from kdfast import data as kd
from kdfast.methods.base import KDMethod
from kdfast.models import BPRMF, LightGCN
from kdfast.train import Trainer, bpr_loss, sample_negatives


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")


class L2Pull(KDMethod):
    """Test method: lam * sum over the batch of (s_student - scale * s_teacher)^2 on (u, pos) and
    (u, neg), with a trainable scale; records its start_epoch calls."""

    name = "l2-pull"

    def __init__(self, teacher_user, teacher_item, lam):
        super().__init__()
        self.register_buffer("tu", teacher_user)
        self.register_buffer("ti", teacher_item)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.lam = lam
        self.epochs_seen = []

    @classmethod
    def build(cls, teacher_user, teacher_item, train, student_dim, *, generator=None, lam=1.0):
        return cls(teacher_user, teacher_item, lam)

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        assert not student_user.requires_grad
        self.epochs_seen.append((epoch, max_epoch))

    def forward(self, student_user, student_item, users, pos, neg):
        loss = 0.0
        for items in (pos, neg):
            s = (student_user[users] * student_item[items]).sum(1)
            t = (self.tu[users] * self.ti[items]).sum(1)
            loss = loss + (s - self.scale * t).pow(2).sum()
        return self.lam * loss


@pytest.fixture(scope="module")
def small():
    d = kd.synthetic(300, 250, seed=0, mean_interactions=20)
    return kd.make_split(d, "loo", seed=0, n_neg=99)


def test_sample_negatives_avoid_training_items():
    indptr = torch.tensor([0, 3, 4, 8])
    items = torch.tensor([0, 1, 2, 3, 0, 1, 2, 4])  # user 2 has one free item (3)
    keys = torch.repeat_interleave(torch.arange(3), indptr[1:] - indptr[:-1]) * 5 + items
    users = torch.tensor([0, 1, 2] * 200)
    neg = sample_negatives(users, keys, 5, torch.Generator().manual_seed(0))
    assert set(neg[users == 0].tolist()) == {3, 4}
    assert set(neg[users == 2].tolist()) == {3}
    assert 3 not in neg[users == 1].tolist()


def test_bpr_loss_is_sum_reduced():
    g = torch.Generator().manual_seed(0)
    ue, ie = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    u, p, n = torch.tensor([0, 1, 3]), torch.tensor([1, 2, 5]), torch.tensor([0, 4, 4])
    want = sum(-F.logsigmoid(ue[a] @ ie[b] - ue[a] @ ie[c]) for a, b, c in zip(u, p, n))
    assert bpr_loss(ue, ie, u, p, n).item() == pytest.approx(float(want), rel=1e-6)


def fit(split, epochs=4, method=None, seed=0, model=None, **kw):
    model = model or BPRMF(
        split.n_users, split.n_items, 16, generator=torch.Generator().manual_seed(seed)
    )
    tr = Trainer(
        model,
        split,
        method=method,
        epochs=epochs,
        batch_size=512,
        lr=kw.pop("lr", 1e-2),
        seed=seed,
        progress=False,
        log=None,
        **kw,
    )
    return model, tr, tr.fit()


def test_trainer_improves_ndcg(small):
    model = BPRMF(small.n_users, small.n_items, 16, generator=torch.Generator().manual_seed(0))
    before = Trainer(model, small, progress=False, log=None).evaluate("valid")["NDCG@10"]
    _, _, r = fit(small, epochs=5, model=model)
    assert r["valid"]["NDCG@10"] > before + 0.05
    assert {"HR@10", "NDCG@10", "MRR@10", "NDCG@20"} <= set(r["test"])
    assert [h["epoch"] for h in r["history"]] == [1, 2, 3, 4, 5]
    assert r["valid"] == r["history"][r["best_epoch"] - 1]["valid"]
    assert r["seconds_per_epoch"] > 0 and r["epochs_run"] == 5


def test_trainer_full_protocol_and_lightgcn():
    d = kd.synthetic(200, 200, seed=1, mean_interactions=20)
    s = kd.make_split(d, "full", seed=0)
    model = LightGCN(s.n_users, s.n_items, 8, s.train, generator=torch.Generator().manual_seed(0))
    _, _, r = fit(s, epochs=3, model=model, eval_every=2)
    assert [h["epoch"] for h in r["history"]] == [2, 3]  # every 2 epochs and after the last
    assert set(r["test"]) >= {"Recall@50", "NDCG@10", "Precision@20"}
    assert r["valid"]["Recall@50"] > 0.1


def test_trainer_is_deterministic(small):
    m1, _, r1 = fit(small, epochs=2, seed=3)
    m2, _, r2 = fit(small, epochs=2, seed=3)
    m3, _, _ = fit(small, epochs=2, seed=4)
    assert torch.equal(m1.user.weight, m2.user.weight) and r1["history"] == r2["history"]
    assert not torch.equal(m1.user.weight, m3.user.weight)


def test_kd_hook_pulls_student_toward_teacher(small):
    g = torch.Generator().manual_seed(9)
    tu, ti = (
        torch.randn(small.n_users, 8, generator=g) * 0.3,
        torch.randn(small.n_items, 8, generator=g) * 0.3,
    )
    method = L2Pull.build(tu, ti, small.train, 16, lam=5.0)
    model, _, r = fit(small, epochs=3, method=method)
    plain, _, _ = fit(small, epochs=3)
    assert method.epochs_seen == [(0, 3), (1, 3), (2, 3)]
    assert method.scale.item() != 0.5  # the method's parameter was optimised with the student
    t = tu @ ti.T
    with torch.no_grad():
        gap = [
            float(((m.user.weight @ m.item.weight.T) - method.scale * t).pow(2).mean())
            for m in (model, plain)
        ]
    assert gap[0] < 0.5 * gap[1]


class FakeValid(Trainer):
    """Trainer whose validation metric is scripted, to test early stopping and best-state
    restore."""

    script = [0.1, 0.3, 0.2, 0.25, 0.29, 0.28, 0.5]

    def evaluate(self, part="valid"):
        if part == "test":
            return {"NDCG@10": float(self.model.user.weight.detach().sum())}
        v = self.script[len(self.calls)]
        self.calls.append(v)
        self.snap[len(self.calls)] = float(self.model.user.weight.detach().sum())
        return {"NDCG@10": v}


def test_early_stopping_restores_best_state(small):
    model = BPRMF(small.n_users, small.n_items, 4, generator=torch.Generator().manual_seed(0))
    tr = FakeValid(model, small, epochs=7, patience=3, progress=False, log=None)
    tr.calls, tr.snap = [], {}
    r = tr.fit()
    assert tr.calls == [0.1, 0.3, 0.2, 0.25, 0.29]  # 3 evaluations without beating 0.3 -> stop
    assert r["best_epoch"] == 2 and r["epochs_run"] == 5
    assert r["test"]["NDCG@10"] == pytest.approx(tr.snap[2])  # model restored to epoch 2


def test_trainer_bad_arguments(small):
    model = BPRMF(small.n_users, small.n_items, 4)
    for kw in (
        {"epochs": 0},
        {"batch_size": -1},
        {"eval_every": 1.5},
        {"patience": True},
        {"lr": 0.0},
    ):
        with pytest.raises(ValueError):
            Trainer(model, small, **kw)
    with pytest.raises(ValueError, match="monitor"):
        Trainer(model, small, monitor="Recall@50")


def test_on_epoch_end_sees_every_epoch_before_validation(small):
    split = small
    model = BPRMF(split.n_users, split.n_items, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def hook(epoch, m):
        assert m is model
        calls.append((epoch, m.user.weight.detach().clone()))

    res = Trainer(
        model, split, epochs=3, eval_every=2, progress=False, log=None, on_epoch_end=hook
    ).fit()
    assert [e for e, _ in calls] == [1, 2, 3]
    assert not torch.equal(calls[0][1], calls[1][1])  # the tables it sees move between epochs
    assert res["epochs_run"] == 3
    with pytest.raises(TypeError, match="on_epoch_end"):
        Trainer(model, split, on_epoch_end=3)
