"""kdfast GPU check and benchmark: one script, run once on a GPU machine.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python bench/gpu.py --precompile 12 --budget-s 520

1. Correctness: every Triton kernel against the reference on the GPU, on fresh random inputs,
   outputs poisoned with NaN before each run so that an unwritten element fails, NaN never passes.
2. Timing: kdfast (Triton) vs the eager reference vs torch.compile of the reference,
   forward+backward where the op has one, CUDA-event medians, peak extra memory.

Each op file bench/ops/<op>.py has two functions:
    checks(device, smoke) -> list of dicts {"op", "case", "ok": bool, "detail"}
    timings(device, smoke) -> list of dicts {"op", "case", "shape", "impl", "ms", "peak_MB", "note"}
(an iterator of dicts works too: its rows are then saved one by one, so a module cut short keeps
them); the timings are the op's benchmark cases whose names begin with "large" (bench/harness.py
runs them). `--smoke` shrinks every shape so the script can be tried on the CPU
(TRITON_INTERPRET=1). `--precompile N` first fills Triton's cache with every kernel variant of the
run (bench/compile_triton.py, N processes at once), so that the checks and timings do not wait on
the compiler one variant at a time.

Each module's checks, then each module's timings (all checks come first: correctness evidence before
speed), run in a child process of their own (`--child MODULE --phase checks|timings`), so that a
CUDA fault, which leaves the process's CUDA context unusable, costs one module and not the rest, and
a hang costs at most --child-timeout seconds. --budget-s is the deadline of the whole run
(precompile included): a child gets at most what is left of it, less a reserve for the summary and
--min-share seconds for each child still to come; once it is spent, the modules left are recorded as
skipped. A child streams its output here as it comes and writes its rows to
OUT/parts/<module>_<phase>.json; a child that crashes or runs out of time becomes a failed check row
(case "crash" / "timeout") or a timing row (impl "crash" / "timeout") with the tail of its output.
After every child, OUT/gpu_results.json and OUT/gpu_table.md (timings with "x eager", the speed-up
over the eager reference of the same case) are rewritten with everything so far, so a run killed
from outside still leaves its results; SIGTERM (an outer `timeout`) ends the running child, records
it as "stopped" and writes them once more. A child also ends itself when this process is gone.
`--in-process` runs every module in this one process instead (for debugging: no timeouts, the budget
is only checked between modules). `--modules` points the runner at other modules
(tests/test_gpu_runner.py). Prints a short table last. Exit code 1 if any check failed (crashed,
timed out or skipped included); 128 + the signal's number when stopped by one. The results belong
under bench/results/<the environment's slug>/ (see bench/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import harness  # noqa: E402
from bench.ops import OPS  # noqa: E402

# the ops' modules, then the sharded top-K's world-size-1 NCCL smoke run and one short training
# epoch per KD method (kdfast's kernels against the eager reference backend)
MODULES = [f"ops.{op}" for op in OPS] + ["ops.distributed_topk", "ops.epoch"]
PHASES = ("checks", "timings")
RESERVE_S = 15.0  # budget kept back for writing the summary after the last child
MIN_CHILD_S = 5.0  # a module is skipped, not started, with less budget left than this


def precompile(n_procs, deadline=None):
    """Run bench/compile_triton.py's work items in parallel processes with Triton's usual cache, for
    the architecture of GPU 0 (sm_90 without one). Prints one line per item. With a deadline
    (time.monotonic()), an item gets at most the time left before it (less the summary reserve), and
    none starts after it."""
    from concurrent.futures import ThreadPoolExecutor

    arch = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        arch = 10 * major + minor
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(ROOT, "bench", "compile_triton.py")
    items = subprocess.run(
        [sys.executable, script, "--keep-cache", "--list"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()

    def one(item):
        left = None if deadline is None else deadline - RESERVE_S - time.monotonic()
        if left is not None and left < MIN_CHILD_S:
            return f"[precompile] {item}: skipped (budget spent)"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, script, "--keep-cache", "--arch", str(arch), "--only", item],
                capture_output=True,
                text=True,
                env=env,
                timeout=left,
            )
        except subprocess.TimeoutExpired:
            return f"[precompile] {item}: killed after {time.perf_counter() - t0:.0f} s (budget)"
        summary = next(
            (ln for ln in proc.stdout.splitlines() if "kernel variants" in ln), proc.stderr[-300:]
        )
        seconds = time.perf_counter() - t0
        return f"[precompile] {item}: rc {proc.returncode}, {seconds:.0f} s; {summary[:160]}"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, n_procs)) as pool:
        for line in pool.map(one, items):
            print(line, flush=True)
    print(f"[precompile] done in {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------- one module, one phase (child or
# in-process)
def module_path(name):
    """The import path of a module name: bench.<name> for the usual ones (ops.topk), the name itself
    for any other dotted one (tests use this to point the runner at stand-in modules)."""
    return f"bench.{name}" if name in MODULES else name if "." in name else f"bench.ops.{name}"


def short_name(name):
    return name.rsplit(".", 1)[-1]


def failure_row(name, phase, case, detail):
    """The row that stands for a module's phase that produced no (or not all) rows: a failed check,
    or a timing row whose impl says what happened."""
    if phase == "checks":
        return {"op": name, "case": case, "ok": False, "detail": detail}
    return {"op": name, "shape": "-", "impl": case, "ms": float("nan"), "note": detail}


def print_row(phase, r):
    if phase == "checks":
        verdict = "ok" if r["ok"] else "FAIL"
        print(
            f"[check] {r['op']:<24} {r['case']:<40} {verdict} {r.get('detail', '')}",
            flush=True,
        )
    else:
        print(f"[time] {r}", flush=True)


def run_phase(name, phase, device, smoke, on_row=None):
    """The rows of one module's checks or timings, run in this process. An exception (a kernel's
    crash or a failed import included) ends the module with a failure row after the rows it
    produced; on_row(rows) is called after each row. A module that does not exist gives no rows."""
    rows = []
    try:
        mod = importlib.import_module(module_path(name))
        for r in getattr(mod, phase)(device, smoke):
            rows.append(r)
            print_row(phase, r)
            if on_row is not None:
                on_row(rows)
    except ModuleNotFoundError as exc:
        if exc.name != module_path(
            name
        ):  # the module is there, something it imports is not: a crash
            rows.append(_crash(name, phase))
        else:
            print(f"[{name}] not present ({exc})", flush=True)
    except Exception:  # noqa: BLE001 - a crash is a failed row, the run goes on
        rows.append(_crash(name, phase))
    return rows


def _crash(name, phase):
    """The failure row of the exception being handled (its traceback printed too)."""
    tb = traceback.format_exc()
    print(tb[-harness.TAIL_CHARS :], flush=True)
    return failure_row(short_name(name), phase, "crash", tb[-2000:])


def part_path(out, name, phase):
    return os.path.join(out, "parts", f"{short_name(name)}_{phase}.json")


def child_main(args):
    """--child: run one module's phase and write {"module", "phase", "done", "rows"} to its parts
    file, after every row (done=False) and at the end (done=True)."""
    harness.exit_with_parent()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = part_path(args.out, args.child, args.phase)

    def save(rows, done=False):
        harness.write_json(
            path, {"module": args.child, "phase": args.phase, "done": done, "rows": rows}
        )

    save(run_phase(args.child, args.phase, device, args.smoke, on_row=save), done=True)
    return 0


# ---------------------------------------------------------------- the parent: children, budget,
# summary
def run_child(name, phase, args, timeout):
    """Run one module's phase in a child process, its output streamed to our stdout, for at most
    timeout seconds. Returns (rows, info, stopped): rows end with a crash / timeout / stopped row
    when the child did not finish; stopped is the Stopped or KeyboardInterrupt that came while it
    ran (else None), for the caller to raise again once the rows are saved."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        name,
        "--phase",
        phase,
        "--out",
        args.out,
    ]
    if args.smoke:
        cmd.append("--smoke")
    print(f"[run] {short_name(name)} {phase}: child process, at most {timeout:.0f} s", flush=True)
    res = harness.run_child(cmd, part_path(args.out, name, phase), timeout)
    rows = list(res.part["rows"]) if res.part else []
    if res.status != "ok":
        detail = f"{res.what}, {len(rows)} rows saved before; output tail:\n{res.tail}"
        rows.append(failure_row(short_name(name), phase, res.status, detail))
        print(f"[run] {short_name(name)} {phase}: {res.what}", flush=True)
    info = {
        "module": short_name(name),
        "phase": phase,
        "status": res.status,
        "rc": res.rc,
        "s": round(res.seconds, 1),
        "rows": len(rows),
    }
    return rows, info, res.stopped


TABLE_COLUMNS = ["op", "shape", "impl", "ms", ("x_eager", "x eager"), "peak_MB", "note"]


def write_summary(out, state, final=False):
    """(Re)write OUT/gpu_results.json and OUT/gpu_table.md with the results so far; returns the
    table."""
    env, checks, timings = state["env"], state["checks"], harness.add_speedups(state["timings"])
    harness.write_json(os.path.join(out, "gpu_results.json"), dict(state, complete=final))
    n_fail = sum(not c["ok"] for c in checks)
    table = (
        f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; {env['date']}\n\n"
    )
    if not final:
        table += "(partial: written while the run was going on; it did not finish)\n\n"
    table += f"checks: {len(checks) - n_fail} passed, {n_fail} failed\n\n"
    for c in checks:
        if not c["ok"]:
            detail = " ".join(str(c.get("detail", "")).split())
            table += f"- FAIL {c['op']} / {c['case']}: {detail[:200]}\n"
    if state["runs"]:
        runs = "; ".join(
            f"{r['module']} {r['phase']} {r['status']} {r['s']:.0f} s" for r in state["runs"]
        )
        table += f"\nruns: {runs}\n"
    shown = [dict(r, note=harness.short_note(r.get("note"))) for r in timings]
    table += "\n" + harness.markdown_table(shown, TABLE_COLUMNS)
    harness.write_file(os.path.join(out, "gpu_table.md"), table)
    return table


def present(name):
    try:
        return importlib.util.find_spec(module_path(name)) is not None
    except ModuleNotFoundError:  # its package is missing
        return False


def main(argv=None):
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes (CPU + TRITON_INTERPRET=1 try-out)"
    )
    ap.add_argument("--only", default="", help="comma-separated op names (e.g. topk,topology)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument(
        "--precompile",
        type=int,
        default=0,
        metavar="N",
        help="compile every kernel variant into Triton's cache first, N processes at once",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        metavar="S",
        help="deadline of the whole run in seconds, precompile included (default 540)",
    )
    ap.add_argument(
        "--child-timeout",
        type=float,
        default=240.0,
        metavar="S",
        help="at most this many seconds for one module's checks or timings (default 240)",
    )
    ap.add_argument(
        "--min-share",
        type=float,
        default=30.0,
        metavar="S",
        help="budget kept for each module's phase still to come when a child starts, so that a "
        "slow module cannot starve the later ones (default 30)",
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run the modules in this process, no child processes (debugging; no timeouts)",
    )
    ap.add_argument(
        "--modules",
        default=",".join(MODULES),
        help="comma-separated modules to run instead of the usual ones (ops.<op>, or a dotted "
        "import path: tests use stand-in modules)",
    )
    ap.add_argument(
        "--child", default=None, help=argparse.SUPPRESS
    )  # internal: run one module in this process
    ap.add_argument("--phase", choices=PHASES, default="checks", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)

    deadline = t_start + args.budget_s
    if args.precompile:
        precompile(args.precompile, deadline)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read by the children too
        if not args.smoke:
            print("no CUDA device: running the smoke configuration in the Triton interpreter")
            args.smoke = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    env = harness.environment(device)
    print("environment:", env, flush=True)
    only = [m for m in args.only.split(",") if m]
    names = []
    for name in (m for m in args.modules.split(",") if m):
        if only and name not in only and short_name(name) not in only:
            continue
        if present(name):
            names.append(name)
        else:
            print(f"[{name}] not present", flush=True)

    state = {"env": env, "checks": [], "timings": [], "runs": []}
    try:
        with (
            harness.stop_on_signals()
        ):  # SIGTERM (the outer timeout) or SIGHUP: end the child, save, stop
            _run_modules(args, names, device, deadline, state)
    except (harness.Stopped, KeyboardInterrupt) as exc:
        code = 128 + exc.signum if isinstance(exc, harness.Stopped) else 130
        by = f"signal {exc.signum}" if isinstance(exc, harness.Stopped) else "Ctrl-C"
        print(f"\n[run] stopped by {by}; results so far in {args.out}", flush=True)
        state["stopped"] = str(exc) or "Ctrl-C"
        print("\n" + write_summary(args.out, state))
        return code
    state["wall_s"] = round(time.monotonic() - t_start, 1)
    table = write_summary(args.out, state, final=True)
    print("\n" + table)
    return 1 if any(not c["ok"] for c in state["checks"]) else 0


def _run_modules(args, names, device, deadline, state):
    """Each module's checks, then (without --skip-timing) each module's timings, within the budget;
    OUT's summary rewritten after each."""
    phases = PHASES[:1] if args.skip_timing else PHASES
    n_children = len(phases) * len(names)
    for p_i, phase in enumerate(phases):
        for n_i, name in enumerate(names):
            still_to_come = n_children - (p_i * len(names) + n_i + 1)
            left = deadline - RESERVE_S - time.monotonic()
            info = {"module": short_name(name), "phase": phase, "status": "in-process", "rc": None}
            stopped = None
            t0 = time.monotonic()
            if left < MIN_CHILD_S:
                rows = [
                    failure_row(
                        short_name(name),
                        phase,
                        "skipped: budget",
                        f"{args.budget_s:.0f} s budget spent before this module",
                    )
                ]
                print_row(phase, rows[0])
                info["status"] = "skipped"
            elif args.in_process:
                rows = run_phase(name, phase, device, args.smoke)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                timeout = min(
                    args.child_timeout, max(MIN_CHILD_S, left - still_to_come * args.min_share)
                )
                rows, info, stopped = run_child(name, phase, args, timeout)
            info.setdefault("s", round(time.monotonic() - t0, 1))
            info.setdefault("rows", len(rows))
            state[phase] += rows
            state["runs"].append(info)
            write_summary(args.out, state)
            if stopped is not None:
                raise stopped


if __name__ == "__main__":
    sys.exit(main())
