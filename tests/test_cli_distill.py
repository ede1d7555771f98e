"""`kdfast distill` end to end on tiny synthetic data (seconds), and its up-front argument
errors."""

import json

import pytest

from kdfast.cli import main
from kdfast.methods import base

TINY = [
    "--data",
    "synthetic",
    "--synthetic-users",
    "120",
    "--synthetic-items",
    "150",
    "--n-neg",
    "40",
    "--teacher-dim",
    "16",
    "--student-dim",
    "4",
    "--epochs",
    "3",
    "--eval-every",
    "1",
    "--lr",
    "0.01",
    "--no-progress",
    "--threads",
    "1",
]


@pytest.fixture(autouse=True)
def setup(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    # a KD method defined by the tests, registered like the real ones
    monkeypatch.setitem(base.METHODS, "l2-pull", ("tests.test_train:L2Pull", {"lam": 0.5}))


def test_distill_end_to_end_and_teacher_reuse(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "distill",
            *TINY,
            "--methods",
            "none,l2-pull",
            "--option",
            "l2-pull.lam=0.25",
            "--seed",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "l2-pull" in printed and "NDCG@10 vs none" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"config", "environment", "teacher", "students"}
    assert res["config"]["methods"] == ["none", "l2-pull"] and res["config"]["protocol"] == "loo"
    assert res["config"]["method_options"] == {"l2-pull": {"lam": 0.25}}
    assert 0 <= res["teacher"]["test"]["NDCG@10"] <= 1 and "HR@10" in res["teacher"]["test"]
    for name in ("none", "l2-pull"):
        s = res["students"][name]
        assert {"test", "valid", "best_epoch", "seconds_per_epoch", "history"} <= set(s)
        assert 1 <= s["best_epoch"] <= 3 and s["seconds_per_epoch"] > 0
        assert [h["epoch"] for h in s["history"]] == [1, 2, 3]
    assert (out / "validation.png").read_bytes()[:4] == b"\x89PNG"
    assert res["teacher"]["loaded"] is False and (out / "teacher.pt").exists()

    # second run: the saved teacher is reused, with identical teacher metrics
    out2 = tmp_path / "run2"
    rc = main(
        [
            "distill",
            *TINY,
            "--methods",
            "none",
            "--seed",
            "1",
            "--teacher",
            str(out / "teacher.pt"),
            "--out",
            str(out2),
        ]
    )
    assert rc == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["teacher"]["loaded"] is True and res2["teacher"]["test"] == res["teacher"]["test"]
    # seeded: same student
    assert res2["students"]["none"]["test"] == res["students"]["none"]["test"]

    # a teacher trained on another split is refused, not silently reused
    rc = main(
        [
            "distill",
            *TINY,
            "--split-seed",
            "5",
            "--teacher",
            str(out / "teacher.pt"),
            "--out",
            str(tmp_path / "r3"),
        ]
    )
    assert rc == 2 and "split_seed" in capsys.readouterr().err


def test_results_record_every_resolved_option_and_the_environment(tmp_path):
    out = tmp_path / "rec"
    rc = main(["distill", *TINY, "--methods", "none,rrd", "--option", "rrd.K=5", "--option",
               "rrd.L=5", "--option", "rrd.N=20", "--out", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    rrd = res["config"]["resolved_method_options"]["rrd"]
    assert rrd == {"N": 20, "K": 5, "L": 5, "T": 10.0, "lam": 1e-3, "sampling": True,
                   "backend": "auto"}  # fmt: skip
    rows = (out / "history.csv").read_text().splitlines()
    assert rows[0].startswith("model,epoch,loss,loss_base,loss_kd,")
    rrd_rows = [r.split(",") for r in rows[1:] if r.startswith("rrd,")]
    assert len(rrd_rows) == len(res["students"]["rrd"]["history"]) == 3
    for r, h in zip(rrd_rows, res["students"]["rrd"]["history"]):
        loss, base, kd = (float(x) for x in r[2:5])
        assert loss == h["loss"] and base + kd == pytest.approx(loss) and kd > 0
    env = res["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and env["backend_resolved"] == "torch"
    assert env["kdfast"] and env["torch"] and env["started"] <= env["finished"]


def test_sweep_chooses_on_validation_and_records_the_grid(tmp_path):
    out = tmp_path / "sweep"
    rc = main(["distill", *TINY, "--methods", "none,rrd", "--option", "rrd.K=5", "--option",
               "rrd.L=5", "--option", "rrd.N=20", "--sweep", "rrd.lam=0.0001,0.1",
               "--sweep", "rrd.T=2,10", "--out", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    sweep = res["students"]["rrd"]["sweep"]
    grid = sweep["grid"]
    want = [{"lam": lam, "T": t} for lam in (0.0001, 0.1) for t in (2, 10)]
    assert [g["options"] for g in grid] == want
    best = max(grid, key=lambda g: g["valid"]["NDCG@10"])
    assert sweep["chosen"] == best["options"]
    assert res["students"]["rrd"]["valid"] == best["valid"]
    # the reported student is the chosen grid point's: its saved file re-scores to the same test
    chosen = best["file"]
    assert chosen.endswith(f"rrd@lam={best['options']['lam']}@T={best['options']['T']}.pt")
    assert all((out / "students" / f).exists() for f in [g["file"].split("/")[-1] for g in grid])


@pytest.mark.parametrize(
    "sweep, message",
    [
        ("rrd.lam", "is not METHOD.KEY=V1,V2"),
        ("de.lam=1,2", "not among --methods"),
        ("rrd.lam=-1,0.1", "lam"),
        ("rrd.bogus=1,2", "bogus"),
    ],
)
def test_sweep_errors_before_training(tmp_path, capsys, sweep, message):
    rc = main(["distill", *TINY, "--methods", "none,rrd", "--sweep", sweep, "--out",
               str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr()
    assert message in err.err and "epoch" not in err.out


def test_distill_full_protocol(tmp_path):
    out = tmp_path / "full"
    rc = main(["distill", *TINY, "--protocol", "full", "--epochs", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["monitor"] == "Recall@50"
    assert {"Recall@50", "NDCG@10", "Precision@20"} <= set(res["students"]["none"]["test"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "none,bogus"], "unknown method(s) bogus"),
        (["--methods", "none,none"], "twice"),
        (["--data", "no/such/file.csv"], "no/such/file.csv"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--monitor", "Recall@50"], "not a loo metric"),
        (["--backend", "fortran"], "--backend"),
        (["--option", "rrd.lam=1"], "not among --methods"),
        (["--option", "lam=1"], "METHOD.KEY=VALUE"),
    ],
)
def test_distill_errors_before_training(tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    rc = main(["distill", *TINY, "--out", str(out), *extra])
    err = capsys.readouterr()
    assert rc == 2 and message in err.err
    assert not (out / "teacher.pt").exists() and "[teacher]" not in err.out


def test_distill_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["distill", *TINY, "--out", str(blocker / "sub")])
    assert rc == 2 and "cannot be written" in capsys.readouterr().err


def test_distill_unavailable_method(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(base.METHODS, "ghost", ("kdfast.methods.no_such_module:Ghost", {}))
    rc = main(["distill", *TINY, "--methods", "ghost", "--out", str(tmp_path / "o")])
    assert rc == 2 and "'ghost' is not available" in capsys.readouterr().err


# small options where a default needs a larger catalog than TINY's 150 items
_SMALL_OPTIONS = {
    "rrd": ["N=40", "K=8", "L=8"],
    "rrd-full": ["N=40", "K=8"],
    "ir-rrd": ["N=40", "K=8", "L=8", "N_I=30"],
    "dcd": ["N=40", "K=8"],
    "unkd": ["n=20"],
    "hetcomp": ["K=60", "dcg_k=20", "start=1", "period=1"],
    "cd": ["N=60"],
}


@pytest.mark.parametrize("name", sorted(base.METHODS))
def test_every_registered_method_trains_through_the_cli(tmp_path, name):
    if name == "l2-pull":
        pytest.skip("test-only method")
    opts = [a for o in _SMALL_OPTIONS.get(name, []) for a in ("--option", f"{name}.{o}")]
    out = tmp_path / name
    rc = main(["distill", *TINY, "--epochs", "2", "--methods", name, *opts, "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    s = res["students"][name]
    assert [h["epoch"] for h in s["history"]] == [1, 2]
    assert all(0 <= v <= 1 for v in s["test"].values())


def test_methods_help_lists_every_registered_method():
    import argparse

    from kdfast.cli.distill import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    text = next(a.help for a in p._actions if "--methods" in a.option_strings)
    listed = set(text.split("(", 1)[1].rstrip(")").replace(" ", "").split(","))
    assert listed == set(base.METHODS) - {"l2-pull"}
