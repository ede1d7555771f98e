"""Checkpoints and --resume: a run stopped after any epoch and resumed gives the bits of an
uninterrupted run with the same seed, for every registered method, a plain BPR student and a teacher
family with its own loss; `kdfast distill --resume` after SIGTERM and after SIGKILL (a crash)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdfast import checkpoint as ckpt
from kdfast import experiment as ex
from kdfast import train as tr
from kdfast.methods.registry import METHODS

# options for a catalog of 150 items (defaults need larger ones)
SMALL = {
    "rrd": {"N": 40, "K": 8, "L": 8},
    "rrd-full": {"N": 40, "K": 8},
    "ir-rrd": {"N": 40, "K": 8, "L": 8, "N_I": 30},
    "dcd": {"N": 40, "K": 8},
    "unkd": {"n": 20},
    "hetcomp": {"K": 60, "dcg_k": 20, "start": 1, "period": 1},
    "cd": {"N": 60},
}
TRAIN = ex.TrainSpec(epochs=4, batch_size=256, eval_every=1, patience=20)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    spec = ex.DataSpec(data="synthetic", synthetic_users=120, synthetic_items=150, protocol="full")
    dataset, split = ex.load_split(spec)
    teacher = ex.get_teacher(dataset, split, spec, ex.TeacherSpec("bprmf", 16), TRAIN, log=None)
    return split, teacher


class Stop(Exception):
    pass


def _stop_after(monkeypatch, stop_epoch):
    """Make Trainer.fit raise right after validating `stop_epoch` (before its checkpoint)."""
    orig = tr.Trainer._validate

    def validate(self, epoch, *args):
        orig(self, epoch, *args)
        if epoch == stop_epoch:
            raise Stop

    monkeypatch.setattr(tr.Trainer, "_validate", validate)


def _student(setup, name, **kw):
    split, teacher = setup
    return ex.train_student(
        split, teacher, name, SMALL.get(name, {}), student_dim=8, train=TRAIN, log=None, **kw
    )


def _same_run(a, b):
    assert [h["epoch"] for h in a["history"]] == [h["epoch"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["loss"] == hb["loss"]  # bit for bit
        assert ha["valid"] == hb["valid"]
        assert ha.get("loss_kd") == hb.get("loss_kd")
    assert a["best_epoch"] == b["best_epoch"] and a["test"] == b["test"]


@pytest.mark.parametrize("name", ["none"] + sorted(m for m in METHODS if m != "l2-pull"))
def test_resumed_student_equals_uninterrupted(setup, name, tmp_path, monkeypatch):
    full = _student(setup, name)
    path = tmp_path / "ck.pt"
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        with pytest.raises(Stop):
            _student(setup, name, checkpoint=path)
    assert ckpt.load(path)["run"]["epochs_run"] == 2  # epoch 3 never reached its checkpoint
    resumed = _student(setup, name, checkpoint=path, resume=True)
    assert resumed["resumed_from"] == 2
    _same_run(full, resumed)
    again = _student(setup, name, checkpoint=path, resume=True)  # a finished checkpoint
    assert again["resumed_from"] == 4
    _same_run(full, again)


def test_the_check_can_fail_without_the_method_state(setup, tmp_path, monkeypatch):
    """RRD resumed without its state (its generator: the sampled lists) trains differently."""
    full = _student(setup, "rrd")
    path = tmp_path / "ck.pt"
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        with pytest.raises(Stop):
            _student(setup, "rrd", checkpoint=path)
    real_restore = ckpt.restore

    def model_only(obj, state):
        return (
            real_restore(obj, state)
            if isinstance(obj, torch.nn.Module) and (hasattr(obj, "embeddings"))
            else obj
        )

    monkeypatch.setattr(ckpt, "restore", model_only)
    resumed = _student(setup, "rrd", checkpoint=path, resume=True)
    assert [h["loss"] for h in resumed["history"][1:]] != [h["loss"] for h in full["history"][1:]]


def test_teacher_family_resumes(setup, tmp_path, monkeypatch):
    split, _ = setup
    kw = dict(name="cml", log=None)
    _, full = ex.train_model("cml", 8, split, TRAIN, **kw)
    path = tmp_path / "cml.pt"
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        with pytest.raises(Stop):
            ex.train_model("cml", 8, split, TRAIN, checkpoint=path, **kw)
    _, resumed = ex.train_model("cml", 8, split, TRAIN, checkpoint=path, resume=True, **kw)
    assert resumed["resumed_from"] == 1
    _same_run(full, resumed)


def test_checkpoint_of_another_run_is_refused(setup, tmp_path):
    path = tmp_path / "ck.pt"
    _student(setup, "none", checkpoint=path)
    split, teacher = setup
    other = ex.TrainSpec(epochs=4, batch_size=256, seed=1)
    with pytest.raises(ValueError, match="another run: seed 0"):
        ex.train_student(
            split, teacher, "none", {}, student_dim=8, train=other, checkpoint=path, resume=True
        )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable kdfast checkpoint"):
        ckpt.load(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        tr.Trainer(torch.nn.Linear(1, 1), split, resume=True)


def test_capture_restores_rebound_state_and_refuses_opaque_objects():
    class Thing:
        def __init__(self):
            self.gen = torch.Generator().manual_seed(1)
            self.table = torch.zeros(3)
            self.fixed = torch.arange(4)
            self.lists = [torch.ones(2), 5]
            self.fn = len

    a = Thing()
    snap = ckpt.Snapshot(a)
    torch.rand(2, generator=a.gen)
    a.table = torch.ones(3)
    a.lists[0].add_(1)  # in place: its version moved
    a.lists.append("new")
    state = ckpt.capture(a, snap)
    b = Thing()
    ckpt.restore(b, state)
    assert torch.equal(b.table, a.table) and b.lists[0].tolist() == [2.0, 2.0]
    assert b.lists[1:] == [5, "new"] and b.fixed is not None
    assert torch.equal(torch.rand(3, generator=b.gen), torch.rand(3, generator=a.gen))
    a.fn = print
    with pytest.raises(TypeError, match=r"object\.fn"):
        ckpt.capture(a, snap)


# ------------------------------------------------------------------------------------------- CLI
CLI = [
    "distill",
    "--data",
    "synthetic",
    "--synthetic-users",
    "300",
    "--synthetic-items",
    "200",
    "--n-neg",
    "40",
    "--teacher-dim",
    "16",
    "--student-dim",
    "4",
    "--epochs",
    "12",
    "--teacher-epochs",
    "3",
    "--batch-size",
    "64",
    "--lr",
    "0.01",
    "--methods",
    "none,rrd",
    "--option",
    "rrd.N=40",
    "--option",
    "rrd.K=8",
    "--option",
    "rrd.L=8",
    "--no-progress",
    "--threads",
    "1",
]


def _cli(out, *extra, **popen):
    env = dict(os.environ, KDFAST_BACKEND="torch", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "kdfast", *CLI, "--out", str(out), *extra]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def _students(out):
    res = json.loads((Path(out) / "results.json").read_text())
    return {k: (v["history"], v["test"], v["best_epoch"]) for k, v in res["students"].items()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_cli_resume_after_a_signal(tmp_path, sig):
    ref = _cli(tmp_path / "ref")
    ref_out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_out
    out = tmp_path / "run"
    proc = _cli(out)
    rrd_ck = out / "checkpoints" / "rrd.pt"
    deadline = time.monotonic() + 240
    while not rrd_ck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before rrd's first checkpoint"
    proc.send_signal(sig)
    text = proc.communicate(timeout=60)[0]
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "--resume" in text, text
    before = json.loads((out / "results.json").read_text())
    assert "none" in before["students"] and "rrd" not in before["students"]
    again = _cli(out, "--resume")
    text = again.communicate(timeout=300)[0]
    assert again.returncode == 0, text
    assert "resumed from" in text and "finished in the interrupted run" in text
    assert _students(out) == _students(tmp_path / "ref")
    res = json.loads((out / "results.json").read_text())
    assert len(res["environment"]["resumed"]) == 1
    assert not (out / "checkpoints").exists()  # the run is complete
    assert not list(out.glob("results-*.json"))  # nothing was moved aside


def test_cli_resume_refuses_another_command(tmp_path, capsys):
    from kdfast.cli import main

    out = tmp_path / "o"
    out.mkdir()
    args = {"epochs": 5, "methods": "none"}
    (out / "results.json").write_text(json.dumps({"config": {"args": args}}))
    rc = main([*CLI, "--out", str(out), "--resume"])
    assert rc == 2
    assert "--epochs 5 (now 12)" in capsys.readouterr().err
