"""kdfast distill --jobs N: the students of a run (methods and --sweep points) trained in N worker
processes give what a run trained one after another gives, for the same threads per student."""

import json

from kdfast.cli import main
from tests.test_cli_distill import TINY

RUN = [
    *TINY,
    "--methods",
    "none,rrd",
    "--option",
    "rrd.N=40",
    "--option",
    "rrd.K=8",
    "--option",
    "rrd.L=8",
    "--sweep",
    "rrd.lam=0.01,0.1",
]


def test_jobs_give_the_serial_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")  # the workers inherit the environment
    assert main(["distill", *RUN, "--out", str(tmp_path / "serial")]) == 0
    assert main(["distill", *RUN, "--jobs", "2", "--out", str(tmp_path / "jobs")]) == 0
    assert "3 in 2 processes, 1 threads each" in capsys.readouterr().out
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())["students"]
    jobs = json.loads((tmp_path / "jobs" / "results.json").read_text())["students"]
    assert serial.keys() == jobs.keys() == {"none", "rrd"}
    for name in serial:
        assert jobs[name]["history"] == serial[name]["history"]
        assert jobs[name]["test"] == serial[name]["test"]

    def no_file(grid):
        return [{k: v for k, v in g.items() if k != "file"} for g in grid]

    assert no_file(jobs["rrd"]["sweep"]["grid"]) == no_file(serial["rrd"]["sweep"]["grid"])
    # each worker logged its evaluations to the shared live log; the final file is whole
    rows = (tmp_path / "jobs" / "history.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 3  # header, teacher, none and the chosen rrd: 3 epochs each


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(["distill", *TINY, "--jobs", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
