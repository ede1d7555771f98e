"""kdfast GPU check and benchmark: one script, run once on a GPU machine.

1. Correctness: every Triton kernel against the reference on the GPU, on fresh random inputs, outputs
   poisoned with NaN before each run so that an unwritten element fails, NaN never passes.
2. Timing: kdfast (Triton) vs the eager reference vs torch.compile of the reference, forward+backward
   where the op has one, CUDA-event medians, peak extra memory.

Each op contributes a module bench/gpu_<op>.py with two functions:
    checks(device, smoke) -> list of dicts {"op", "case", "ok": bool, "detail"}
    timings(device, smoke) -> list of dicts {"op", "shape", "impl", "ms", "peak_MB", "note"}
`--smoke` shrinks every shape so the script can be tried on the CPU (TRITON_INTERPRET=1).
`--precompile N` first fills Triton's cache with every kernel variant (bench/compile_triton.py, N
processes at once), so that the checks and timings do not wait on the compiler one variant at a time.
Writes details to $OUT (or --out) and prints a short table last. Exit code 1 if any check failed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import markdown_table  # noqa: E402

MODULES = ["gpu_topk", "gpu_plackett_luce", "gpu_full_catalog", "gpu_topology"]


def precompile(n_procs):
    """Run bench/compile_triton.py's work items in parallel processes with Triton's usual cache, for the
    architecture of GPU 0 (sm_90 without one). Prints one line per item."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    arch = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        arch = 10 * major + minor
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(root, "bench", "compile_triton.py")
    items = subprocess.run([sys.executable, script, "--keep-cache", "--list"], capture_output=True, text=True,
                           env=env, check=True).stdout.split()

    def one(item):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, script, "--keep-cache", "--arch", str(arch), "--only", item],
                              capture_output=True, text=True, env=env)
        summary = next((ln for ln in proc.stdout.splitlines() if "kernel variants" in ln), proc.stderr[-300:])
        return f"[precompile] {item}: rc {proc.returncode}, {time.perf_counter() - t0:.0f} s; {summary[:160]}"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, n_procs)) as pool:
        for line in pool.map(one, items):
            print(line, flush=True)
    print(f"[precompile] done in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU + TRITON_INTERPRET=1 try-out)")
    ap.add_argument("--only", default="", help="comma-separated module names (e.g. gpu_topk)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--precompile", type=int, default=0, metavar="N",
                    help="compile every kernel variant into Triton's cache first, N processes at once")
    args = ap.parse_args(argv)
    if args.precompile:
        precompile(args.precompile)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if not args.smoke:
            print("no CUDA device: running the smoke configuration in the Triton interpreter")
            args.smoke = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    import triton
    env = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d")}
    print("environment:", env, flush=True)
    names = [m for m in MODULES if not args.only or m in args.only.split(",")]
    checks, timings = [], []
    for name in names:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"[{name}] not present ({exc})")
            continue
        try:
            res = mod.checks(device, args.smoke)
        except Exception:  # noqa: BLE001 - a crash is a failed check, the run goes on
            res = [{"op": name, "case": "crash", "ok": False, "detail": traceback.format_exc()[-2000:]}]
        for r in res:
            print(f"[check] {r['op']:<24} {r['case']:<40} {'ok' if r['ok'] else 'FAIL'} {r.get('detail', '')}", flush=True)
        checks += res
    if not args.skip_timing:
        for name in names:
            try:
                mod = importlib.import_module(f"bench.{name}")
                res = mod.timings(device, args.smoke)
            except ModuleNotFoundError:
                continue
            except Exception:  # noqa: BLE001
                res = [{"op": name, "shape": "-", "impl": "crash", "ms": float("nan"), "note": traceback.format_exc()[-1500:]}]
                print(res[0]["note"], flush=True)
            for r in res:
                print(f"[time] {r}", flush=True)
            timings += res
            if device.type == "cuda":
                torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
        json.dump({"env": env, "checks": checks, "timings": timings}, f, indent=1, default=str)
    n_fail = sum(not c["ok"] for c in checks)
    table = (f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; {env['date']}\n\n"
             f"checks: {len(checks) - n_fail} passed, {n_fail} failed\n\n"
             + markdown_table(timings, ["op", "shape", "impl", "ms", "peak_MB", "note"]))
    with open(os.path.join(args.out, "gpu_table.md"), "w") as f:
        f.write(table)
    print("\n" + table)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
