"""kdfast distill's live logs: history.csv grows with each evaluation while the run goes on, and
--tensorboard writes the same numbers as TensorBoard scalars."""

import csv
import json

import pytest

from kdfast.cli import main
from kdfast.cli.distill import _LiveLog
from kdfast.cli.errors import UsageError
from tests.test_cli_distill import TINY


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")


def test_history_rows_are_written_as_they_come(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("stale\n")
    live = _LiveLog(path, fresh=True)
    assert not path.exists()  # a fresh run starts a new log
    hook = live.hook("student rrd")
    hook({"epoch": 1, "loss": 3.5, "loss_base": 3.0, "loss_kd": 0.5, "valid": {"R@5": 0.25}})
    rows = list(csv.reader(path.open()))
    assert rows == [
        ["model", "epoch", "loss", "loss_base", "loss_kd", "R@5"],
        ["student rrd", "1", "3.5", "3.0", "0.5", "0.25"],
    ]
    hook({"epoch": 2, "loss": 2.5, "valid": {"R@5": 0.5}})
    assert list(csv.reader(path.open()))[2] == ["student rrd", "2", "2.5", "", "", "0.5"]
    live.close()
    resumed = _LiveLog(path, fresh=False)  # --resume keeps the log
    assert path.exists()
    resumed.close()


def test_tensorboard_scalars_match_results(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "o", tmp_path / "tb"
    rc = main(["distill", *TINY, "--methods", "none", "--out", str(out), "--tensorboard", str(tb)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for model, entry in (("teacher", res["teacher"]), ("none", res["students"]["none"])):
        hist = entry["history"]
        loss = [e.value for e in acc.Scalars(f"{model}/loss")]
        assert loss == pytest.approx([h["loss"] for h in hist], rel=1e-6)
        metric = next(iter(hist[0]["valid"]))
        assert f"{model}/valid/{metric}" in tags
        got = [e.value for e in acc.Scalars(f"{model}/valid/{metric}")]
        assert got == pytest.approx([h["valid"][metric] for h in hist], rel=1e-6)
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert {r["model"] for r in rows} == {"teacher", "none"}


def test_tensorboard_missing_is_a_usage_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(UsageError, match=r"kdfast\[tensorboard\]"):
        _LiveLog(tmp_path / "h.csv", tmp_path / "tb", fresh=True)
