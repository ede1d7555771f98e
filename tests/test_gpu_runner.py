"""bench/gpu.py's runner without a GPU and without the real modules' work: stand-in modules (written
to a temporary folder and passed with --modules) that pass, crash the process, raise, hang, or hang
after one row, so that the child processes, the timeout, the budget and the results written as the
run goes are tested in seconds; and the layout the runner expects of the real op files
(bench/ops/<op>.py)."""

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, "bench", "gpu.py")

FAKES = {
    # checks and timings pass
    "fake_ok": """
        def checks(device, smoke):
            return [{"op": "fake_ok", "case": "a", "ok": True, "detail": ""}]

        def timings(device, smoke):
            return [{"op": "fake_ok", "shape": "s", "impl": "x", "ms": 1.0}]
    """,
    # checks: the process dies (as after a CUDA fault); timings: an exception
    "fake_crash": """
        import os

        def checks(device, smoke):
            print("about to die", flush=True)
            os._exit(3)

        def timings(device, smoke):
            raise RuntimeError("boom")
    """,
    # checks: hangs (a kernel that never ends); timings: one row, then hangs (rows come one by one)
    "fake_hang": """
        import os
        import time

        def checks(device, smoke):
            if os.environ.get("FAKE_PID_FILE"):  # tells the test that the child runs, and its pid
                with open(os.environ["FAKE_PID_FILE"], "w") as f:
                    f.write(str(os.getpid()))
            print("hanging", flush=True)
            time.sleep(600)

        def timings(device, smoke):
            yield {"op": "fake_hang", "shape": "s", "impl": "first", "ms": 2.0}
            time.sleep(600)
    """,
}


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    pkg = tmp_path / "fakegpu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, src in FAKES.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(src))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")])
    )
    return tmp_path


def run_gpu(out, *args, timeout=60):
    proc = subprocess.run(
        [sys.executable, GPU, "--smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    with open(os.path.join(out, "gpu_results.json")) as f:
        return proc, json.load(f)


def test_crash_and_timeout_cost_one_module(fakes):
    out = fakes / "out"
    proc, res = run_gpu(
        out,
        "--modules",
        "fakegpu.fake_crash,fakegpu.fake_hang,fakegpu.fake_ok",
        "--child-timeout",
        "4",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    checks = {(c["op"], c["case"]): c for c in res["checks"]}
    assert set(checks) == {("fake_crash", "crash"), ("fake_hang", "timeout"), ("fake_ok", "a")}
    assert "exit code 3" in checks["fake_crash", "crash"]["detail"]
    assert "about to die" in checks["fake_crash", "crash"]["detail"]  # the child's output tail
    assert "hanging" in checks["fake_hang", "timeout"]["detail"]
    assert checks["fake_ok", "a"]["ok"]  # runs after a crash and a hang
    impls = [(t["op"], t["impl"]) for t in res["timings"]]
    # the exception is a crash row; the hanging module keeps the row it gave before its timeout
    assert impls == [
        ("fake_crash", "crash"),
        ("fake_hang", "first"),
        ("fake_hang", "timeout"),
        ("fake_ok", "x"),
    ]
    assert "boom" in res["timings"][0]["note"]
    assert res["complete"]
    assert [r["status"] for r in res["runs"]] == ["crash", "timeout", "ok", "ok", "timeout", "ok"]
    assert "about to die" in proc.stdout  # children's output streamed
    table = (out / "gpu_table.md").read_text()
    assert "checks: 1 passed, 2 failed" in table and "(partial" not in table
    assert proc.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table comes last


def test_budget_spent_skips_modules(fakes):
    out = fakes / "out"
    proc, res = run_gpu(out, "--modules", "fakegpu.fake_ok", "--budget-s", "1")
    assert proc.returncode == 1
    assert [(c["case"], c["ok"]) for c in res["checks"]] == [("skipped: budget", False)]
    assert [t["impl"] for t in res["timings"]] == ["skipped: budget"]


def test_only_and_skip_timing_in_process(fakes):
    out = fakes / "out"
    proc, res = run_gpu(
        out,
        "--modules",
        "fakegpu.fake_crash,fakegpu.fake_ok",
        "--only",
        "fake_ok",
        "--skip-timing",
        "--in-process",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c["op"] for c in res["checks"]] == ["fake_ok"] and res["timings"] == []
    assert [r["status"] for r in res["runs"]] == ["in-process"]


def test_sigterm_saves_results_and_ends_the_child(fakes, monkeypatch):
    """The outer timeout's SIGTERM: the running child is killed and the results so far are
    written."""
    out, pid_file = fakes / "out", fakes / "child.pid"
    monkeypatch.setenv("FAKE_PID_FILE", str(pid_file))
    proc = subprocess.Popen(
        [
            sys.executable,
            GPU,
            "--smoke",
            "--out",
            str(out),
            "--modules",
            "fakegpu.fake_ok,fakegpu.fake_hang",
            "--skip-timing",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    t0 = time.monotonic()
    while not pid_file.exists() and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=30)[0]
    assert proc.returncode == 128 + signal.SIGTERM, stdout
    res = json.loads((out / "gpu_results.json").read_text())
    assert not res["complete"] and res["stopped"] == f"signal {int(signal.SIGTERM)}"
    assert [(c["op"], c["case"], c["ok"]) for c in res["checks"]] == [
        ("fake_ok", "a", True),
        ("fake_hang", "stopped", False),
    ]
    assert "(partial" in (out / "gpu_table.md").read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_min_share_keeps_budget_for_later_modules(fakes):
    """A hanging first module gets the budget less the summary reserve (15 s) and --min-share for
    the one module still to come, not the whole --child-timeout."""
    out = fakes / "out"
    proc, res = run_gpu(
        out,
        "--modules",
        "fakegpu.fake_hang,fakegpu.fake_ok",
        "--skip-timing",
        "--budget-s",
        "40",
        "--min-share",
        "19",
        "--child-timeout",
        "100",
    )
    assert [(c["op"], c["case"]) for c in res["checks"]] == [
        ("fake_hang", "timeout"),
        ("fake_ok", "a"),
    ]
    assert res["runs"][0]["s"] < 15  # 40 - 15 - 19 = 6 s
    assert res["checks"][1]["ok"]


def test_every_op_file_has_what_the_runners_need():
    """Each of bench/gpu.py's modules is an op file of bench/ops with checks and timings, and
    benchmark cases for both runners: a GPU smoke case and a GPU run case ("large...") for every
    benchmarked function, small and large CPU cases, and providers on each device kind, the eager
    reference among them."""
    sys.path.insert(0, ROOT)
    from bench import gpu, harness
    from bench.ops import OPS

    assert [gpu.module_path(m) for m in gpu.MODULES] == [
        f"bench.ops.{op}"
        for op in (
            "topk",
            "plackett_luce",
            "full_catalog",
            "topology",
            "rank_of_ids",
            "distributed_topk",
            "epoch",
        )
    ]
    for name in gpu.MODULES:
        mod = importlib.import_module(gpu.module_path(name))
        assert callable(mod.checks) and callable(mod.timings), name
        # an op's file has its benchmark cases; the runner's other modules need not
        benches = mod.BENCHES if name.split(".")[-1] in OPS else getattr(mod, "BENCHES", ())
        for bench in benches:
            assert bench.case_names("cuda", "smoke") == ["smoke"], bench.op
            assert bench.case_names("cuda", "run"), bench.op
            assert {"small", "large"} <= set(bench.case_names("cpu")), bench.op
            for kind in ("cpu", "cuda"):
                for case in bench.case_names(kind):
                    names = [
                        harness.provider_name(p, kind)
                        for p in bench.providers_for(kind, bench.params(kind, case))
                    ]
                    assert any(n.startswith("kdfast") for n in names), (bench.op, kind, case, names)
            assert any(p.name == harness.BASELINE for p in bench.providers), bench.op
