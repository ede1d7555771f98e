"""The GPU code path of every Triton kernel compiles for sm_90 (Triton -> LLVM -> PTX -> ptxas),
checked on a machine without a GPU: the interpreter runs the kernels' semantics but never this path.
Runs bench/compile_triton.py on the smoke shapes of the GPU checks (bench/ops/<op>.py) in a
subprocess (the kernels must be decorated without TRITON_INTERPRET)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this triton wheel ships no ptxas")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "compile_triton.py"),
            "--only",
            "checks:topk,checks:plackett_luce,checks:full_catalog,checks:topology,checks:rank_of_ids",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(0 failed)" in proc.stdout
    n = int(proc.stdout.split(" kernel variants")[0].rsplit(" ", 1)[1])
    assert n >= 40, proc.stdout[:500]  # every op's kernels were reached, not just the first
    assert "could not go on" not in proc.stdout, proc.stdout[-2000:]


def test_the_compile_list_holds_every_launch_flag_per_op():
    """Beyond the check shapes, the full list (the compile report's) sweeps every kernel's launch
    flags per input dtype for each op (flags:<op>:<dtype>); the GPU run's precompile list leaves
    them out."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(ROOT, "bench", "compile_triton.py")

    def items(flag):
        cmd = [sys.executable, script, flag]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
        return out.stdout.split()

    every, run = items("--list-all"), items("--list")
    flags = {item.split(":")[1] for item in every if item.startswith("flags:")}
    assert flags == {"topk", "plackett_luce", "full_catalog", "topology", "rank_of_ids"}
    assert "flags:plackett_luce:float64" in every and "flags:topology:float16" in every
    assert set(run) == {item for item in every if not item.startswith("flags:")}
    assert {f"checks:{op}" for op in flags} <= set(run)
