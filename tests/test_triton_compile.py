"""The GPU code path of every Triton kernel compiles for sm_90 (Triton -> LLVM -> PTX -> ptxas), checked
on a machine without a GPU: the interpreter runs the kernels' semantics but never this path. Runs
bench/compile_triton.py on the smoke shapes of the GPU checks in a subprocess (the kernels must be
decorated without TRITON_INTERPRET)."""
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
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_triton.py"),
                           "--only", "gpu_topk,gpu_plackett_luce,gpu_full_catalog,gpu_topology"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(0 failed)" in proc.stdout
    n = int(proc.stdout.split(" kernel variants")[0].rsplit(" ", 1)[1])
    assert n >= 40, proc.stdout[:500]  # every op's kernels were reached, not just the first
    assert "could not go on" not in proc.stdout, proc.stdout[-2000:]
