"""The teacher families (kdfast.families) in kdfast's pipeline: trained by kdfast.Trainer with their
own losses, evaluated by their exact scores (dot_tables, or score_pairs for NeuMF), and distilled
from through the CLI."""

import json

import pytest
import torch

from kdfast import data as kd
from kdfast import metrics
from kdfast.cli import main
from kdfast.families import FAMILIES, dot_tables
from kdfast.models import BPRMF, build_model
from kdfast.train import Trainer
from tests.test_cli_distill import TINY
from tests.test_models_metrics import brute_force


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(kind, split, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return build_model(kind, split.n_users, split.n_items, dim, split.train, generator=g)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_dot_tables_give_the_exact_scores(kind):
    split = kd.make_split(kd.synthetic(30, 50, seed=1), "full", seed=0)
    m = _model(kind, split)
    users, items = torch.arange(30), torch.arange(50)
    with torch.no_grad():
        want = m.score_pairs(users, items)
    if m.score is None:
        with pytest.raises(ValueError, match="topk_from_scorer"):
            dot_tables(m)
        return
    u, v = dot_tables(m)
    torch.testing.assert_close(u @ v.T, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("protocol", ["full", "loo"])
@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_trainer_trains_each_family_and_evaluates_its_exact_scores(kind, protocol):
    split = kd.make_split(kd.synthetic(80, 120, seed=2), protocol, seed=0, n_neg=30)
    m = _model(kind, split)
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    r = Trainer(
        m, split, epochs=3, lr=1e-2, weight_decay=0.0, eval_every=3, progress=False, log=None
    ).fit()
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())  # it trained
    # the trainer's test metrics are those of the model's exact scores, ranked densely
    with torch.no_grad():
        scores = m.score_pairs(torch.arange(split.n_users), torch.arange(split.n_items))
    eye = torch.eye(split.n_users)
    want = brute_force(eye, scores.T.contiguous(), split, "test")  # eye @ scores = scores
    assert r["test"] == pytest.approx(want, abs=1e-6)
    if kind == "cml":  # constrain() ran after each step: every row inside the unit ball
        u, v = (t.detach() for t in m.embeddings())
        assert float(u.norm(dim=1).max()) <= 1 + 1e-6 and float(v.norm(dim=1).max()) <= 1 + 1e-6


def test_scorer_evaluation_matches_the_table_evaluation():
    # evaluate_scorer (NeuMF's path) on a dot-product model agrees with evaluate on its tables
    for protocol in ("full", "loo"):
        split = kd.make_split(kd.synthetic(60, 90, seed=3), protocol, seed=1, n_neg=20)
        m = BPRMF(split.n_users, split.n_items, 6, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            m.user.weight.normal_(generator=torch.Generator().manual_seed(1))
            m.item.weight.normal_(generator=torch.Generator().manual_seed(2))
        u, v = m.embeddings()

        def pairs(users, items, u=u, v=v):
            return u[users] @ v[items].T

        for part in ("valid", "test"):
            a = metrics.evaluate_scorer(pairs, split, part, batch=7)
            b = metrics.evaluate(u.detach(), v.detach(), split, part)
            assert a == pytest.approx(b, abs=1e-12)


def test_a_family_cannot_be_a_kd_student():
    split = kd.make_split(kd.synthetic(20, 30, seed=1), "full", seed=0)
    with pytest.raises(ValueError, match="KD student"):
        Trainer(_model("cml", split), split, method=torch.nn.Module())


def test_distill_from_a_cml_teacher_through_the_cli(tmp_path):
    out = tmp_path / "cml"
    rc = main(
        [
            "distill", *TINY, "--teacher-model", "cml", "--epochs", "2",
            "--methods", "none,rrd", "--option", "rrd.N=20", "--option", "rrd.K=5",
            "--option", "rrd.L=5", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["teacher_model"] == "cml"
    assert res["teacher"]["test"]["NDCG@10"] > 0
    assert set(res["students"]) == {"none", "rrd"}
