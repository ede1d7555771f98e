"""kdfast distill on two processes (torch.distributed, gloo, CPU): the data-parallel run completes,
writes the documented results, repeats itself bit for bit, and ranks like the one-process run; a
rank that raises ends every rank with an error instead of a hang."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from kdfast.cli import main

ROOT = Path(__file__).resolve().parent.parent
RUN = [
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
    "3",
    "--lr",
    "0.01",
    "--no-progress",
    "--threads",
    "1",
]
RRD = ["--option", "rrd.N=40", "--option", "rrd.K=8", "--option", "rrd.L=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, KDFAST_BACKEND="torch", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(_free_port()), "-m", "kdfast", *RUN, *args, "--out", str(out)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_two_processes_complete_repeat_and_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    methods = ["--methods", "none,rrd,de", *RRD]
    assert main([*RUN, *methods, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = _torchrun(tmp_path / "two", *methods)
    again = _torchrun(tmp_path / "again", *methods)
    schema = json.loads((ROOT / "docs" / "results.schema.json").read_text())
    jsonschema.validate(two, schema)
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    for name in ("none", "rrd", "de"):
        assert again["students"][name]["history"] == two["students"][name]["history"]  # repeats
        assert (tmp_path / "two" / "students" / f"{name}.pt").exists()
    # BPR and RRD's sums over a batch's users are those of one process: the same rankings up to
    # the order of float32 sums (losses to 1e-6 relative, metrics equal at this size)
    for name in ("none", "rrd"):
        h1, h2 = one["students"][name]["history"], two["students"][name]["history"]
        assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-6)
        assert [h["valid"] for h in h2] == [
            pytest.approx(h["valid"], abs=1e-12) for h in h1
        ]  # fmt: skip
    # DE's sums over a batch's unique items count an item once per rank holding it: close only
    de1, de2 = one["students"]["de"]["test"], two["students"]["de"]["test"]
    assert de2 == pytest.approx(de1, abs=0.05)


def test_a_failing_rank_ends_every_rank(tmp_path):
    """Two processes started by hand (no torchrun agent to stop the others): rank 1 raises in its
    second epoch; rank 0, waiting in the step's all_reduce, must fail too, with an error, well
    before the --dist-timeout of 120 s."""
    port = _free_port()
    script = str(ROOT / "tests" / "_distill_rank_fails.py")
    args = [*RUN, "--methods", "fails-on-rank-1", "--dist-timeout", "120"]
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = ["--out", str(tmp_path / f"out{rank}")]
        procs.append(
            subprocess.Popen(
                [sys.executable, script, *args, *out],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    t0 = time.monotonic()
    texts = [p.communicate(timeout=110)[0] for p in procs]  # a hang fails here
    assert time.monotonic() - t0 < 110
    assert procs[1].returncode != 0 and "this method fails on rank 1" in texts[1]
    assert procs[0].returncode != 0, texts[0]
    assert "data-parallel training" in texts[0] or "collective" in texts[0], texts[0][-2000:]
