"""Run the ops' benchmark cases, one child process per provider, and write the results per op.

    python -m bench.run --device cpu [--ops topk,plackett_luce] [--cases small,large] [--threads
    1,2]

Each provider of each case (and thread count) runs in a fresh child process: the same seeded inputs,
warm-up calls (for torch.compile these include compilation), then the median wall time of the timed
calls, and the peak extra memory over them (CPU: the growth of the process's peak resident set over
its resident set before the timed calls; CUDA: the allocator's peak), which is clean only in a
process that runs nothing else. The result of the last call is compared with the eager reference's.
A child that crashes or outlives --child-timeout becomes a row that says so; the results are
rewritten after every child to OUT/<op>.md and OUT/<op>.json, OUT being bench/results/<device slug>/
unless --out says otherwise (bench/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

import torch

from bench import harness
from bench.ops import OPS

COLUMNS = [
    "case",
    "shape",
    "threads",
    "impl",
    "ms",
    ("x_eager", "x eager"),
    ("peak_MB", "peak extra MB"),
    "runs",
    ("first_call_s", "first call s"),
    ("agreement", "vs eager reference"),
    "note",
]
INTRO = [
    "- each provider in a child process of its own; median wall time of the timed calls after",
    "  warm-up (the first call's seconds include torch.compile's compilation); peak extra MB: the",
    "  growth of the peak resident set (CPU; VmHWM) or of CUDA's allocator peak over what was in",
    "  use before the timed calls; x eager: speed-up over the eager reference of the same case and",
    "  thread count; vs eager reference: the last call's result against the eager reference's",
    "  (share of equal ids; largest difference of values over the reference's largest magnitude);",
    "  forward + backward unless the provider's name says otherwise.",
]


def _select(names, wanted):
    return [n for n in names if not wanted or n in wanted]


def plan(args, kind):
    """[(op, [(bench index, case, threads, provider name, shape), ...]), ...] in run order."""
    out = []
    for op in _select(OPS, args.ops):
        mod = importlib.import_module(f"bench.ops.{op}")
        jobs = []
        for i, bench in enumerate(mod.BENCHES):
            for case in _select(bench.case_names(kind), args.cases):
                params = bench.params(kind, case)
                for threads in args.threads:
                    for p in bench.providers_for(kind, params):
                        name = harness.provider_name(p, kind)
                        if not args.providers or any(s in name for s in args.providers):
                            jobs.append((i, case, threads, name, bench.label(params)))
        out.append((op, jobs))
    return out


def child(args):
    """One provider in this process: its row to the part file, its result to the result file."""
    harness.exit_with_parent()
    torch.set_num_threads(args.child_threads)
    bench = importlib.import_module(f"bench.ops.{args.child}").BENCHES[args.bench]
    kind = args.device
    provider = bench.provider(args.provider, kind)
    row, out = harness.timing_row(bench, kind, args.case, provider, torch.device(args.device))
    row["threads"] = args.child_threads
    print(f"[row] {row}", flush=True)
    if out is not None:
        torch.save(_to_cpu(out), args.result)
    harness.write_json(args.part, {"done": True, "rows": [row]})
    return 0


def _to_cpu(out):
    if isinstance(out, (tuple, list)):
        return tuple(_to_cpu(o) for o in out)
    return out.detach().cpu() if isinstance(out, torch.Tensor) else None


def run_op(op, jobs, args, env, out_dir, tmp, deadline):
    """Run one op's jobs in child processes; rewrite its results after every child."""
    rows, outputs = [], []
    for i, case, threads, name, shape in jobs:
        row = {
            "op": op,
            "case": case,
            "shape": shape,
            "threads": threads,
            "impl": name,
            "ms": float("nan"),
        }
        out = stopped = None
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < 5:
            row["note"] = "skipped: budget spent"
        else:
            part, result = os.path.join(tmp, "part.json"), os.path.join(tmp, "result.pt")
            if os.path.exists(result):  # the last child's: not this one's
                os.remove(result)
            cmd = [
                sys.executable,
                "-m",
                "bench.run",
                "--device",
                args.device,
                "--child",
                op,
                "--bench",
                str(i),
                "--case",
                case,
                "--provider",
                name,
                "--child-threads",
                str(threads),
                "--part",
                part,
                "--result",
                result,
            ]
            timeout = args.child_timeout if left is None else min(args.child_timeout, left)
            print(
                f"[run] {op} {case}, {threads} threads: {name} (at most {timeout:.0f} s)",
                flush=True,
            )
            env_vars = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=harness.ROOT)
            res = harness.run_child(cmd, part, timeout, env=env_vars)
            if res.part and res.part.get("rows"):
                row = res.part["rows"][0]
            else:
                row["note"] = f"{res.status}: {res.what}; output tail: {res.tail[-300:]}"
            out = torch.load(result) if os.path.exists(result) else None
            stopped = res.stopped
        rows.append(row)
        outputs.append(out)
        _write(op, rows, outputs, args, env, out_dir)
        if stopped is not None:
            raise stopped
    return rows


def _write(op, rows, outputs, args, env, out_dir):
    """The op's results so far, with speed-ups and each result against the eager reference's."""
    key = lambda r: (r["op"], r["case"], r["threads"])  # noqa: E731
    base = {
        key(r): o for r, o in zip(rows, outputs) if r["impl"] == harness.BASELINE and o is not None
    }
    for r, o in zip(rows, outputs):
        if o is not None and key(r) in base and r["impl"] != harness.BASELINE:
            r["agreement"] = harness.agreement(o, base[key(r)])
    harness.add_speedups(rows)
    env["load"] = harness.load_note()
    command = "python -m bench.run " + " ".join(args.argv)
    path = os.path.join(out_dir, f"{op}.md")
    harness.write_results(
        path, f"{op} on {env['device']}", env, rows, ["op"] + COLUMNS, INTRO, command
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--ops", default="", help=f"comma-separated ops (default: all of {', '.join(OPS)})"
    )
    ap.add_argument(
        "--cases", default="", help="comma-separated case names (default: all: small, large, ...)"
    )
    ap.add_argument(
        "--providers", default="", help="comma-separated parts of provider names (default: all)"
    )
    ap.add_argument("--threads", default=str(os.cpu_count()), help="comma-separated thread counts")
    ap.add_argument(
        "--out", default=None, help="results folder (default: bench/results/<device slug>)"
    )
    ap.add_argument("--child-timeout", type=float, default=900.0, metavar="S")
    ap.add_argument(
        "--budget-s", type=float, default=None, metavar="S", help="deadline of the whole run"
    )
    for hidden in (
        "--child",
        "--bench",
        "--case",
        "--provider",
        "--child-threads",
        "--part",
        "--result",
    ):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.bench, args.child_threads = int(args.bench), int(args.child_threads)
        return child(args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.ops, args.cases, args.providers = (
        [x for x in v.split(",") if x] for v in (args.ops, args.cases, args.providers)
    )
    args.threads = [int(x) for x in args.threads.split(",")]
    device = torch.device(args.device)
    env = harness.environment(device, threads=",".join(map(str, args.threads)))
    out_dir = args.out or os.path.join(harness.RESULTS, env["slug"])
    print("environment:", env, flush=True)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="kdfast-bench-") as tmp, harness.stop_on_signals():
        for op, jobs in plan(args, args.device):
            rows = run_op(op, jobs, args, env, out_dir, tmp, deadline)
            print(harness.markdown_table(rows, COLUMNS), flush=True)
    print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
