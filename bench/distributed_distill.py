"""kdfast distill on one process against two (torchrun, gloo, CPU): seconds per epoch, and whether
the two-process run's metrics stay within the one-process run's seed-to-seed noise.

    python bench/distributed_distill.py --data citeulike-t --methods none,rrd --epochs 10 \
        [--seeds 0,1,2] [--out bench/results/<device>/distributed_distill.md]

A teacher is trained once (one process) and shared by every run (--teacher). Then, for the same
cores: one process with all the threads, one process per seed in --seeds (the noise), and two
processes (torchrun --nproc-per-node 2) with half the threads each, seed --seeds[0]. Every run
trains each method's student for exactly --epochs epochs (patience large), evaluated at the end.
The table gives each student's training seconds per epoch (the trainer's clock) and its test
metric; the tolerance compares |two processes - one process| at the same seed with the spread
(max - min) of the one-process metric over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import cpu_model, load_note  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="citeulike-t")
    ap.add_argument("--protocol", default="full")
    ap.add_argument("--methods", default="none,rrd")
    ap.add_argument("--option", action="append", default=[])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--teacher-epochs", type=int, default=50)
    ap.add_argument("--teacher-dim", type=int, default=200)
    ap.add_argument("--student-dim", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--grad-sync",
        default="dense,sparse",
        help="the two-process runs: one per kdfast distill --grad-sync mode in this list",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kdfast-dist-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["distill", "--data", args.data, "--protocol", args.protocol, "--no-progress"]
    common += ["--teacher-dim", str(args.teacher_dim), "--student-dim", str(args.student_dim)]
    common += ["--eval-every", str(args.epochs), "--patience", "1000"]
    teacher = work / "teacher.pt"
    kd = [sys.executable, "-m", "kdfast"]
    _run(kd + common + ["--methods", "none", "--epochs", "1", "--teacher-epochs",
                        str(args.teacher_epochs), "--teacher", str(teacher), "--threads",
                        str(args.threads), "--out", str(work / "teacher-run")], env)  # fmt: skip
    for o in args.option:
        common += ["--option", o]
    runs = {}
    for seed in seeds:
        name = f"1 process, {args.threads} threads, seed {seed}"
        cmd = kd + common + ["--methods", args.methods, "--epochs", str(args.epochs)]
        cmd += ["--teacher", str(teacher), "--seed", str(seed), "--threads", str(args.threads)]
        wall = _run(cmd + ["--out", str(work / f"one-{seed}")], env)
        runs[name] = (work / f"one-{seed}", wall, 1, seed)
    half = max(1, args.threads // 2)
    two_names = []
    for mode in args.grad_sync.split(","):
        name = f"2 processes, {half} threads each, seed {seeds[0]}, --grad-sync {mode}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        cmd += ["--master-port", str(_port()), "-m", "kdfast", *common, "--methods", args.methods]
        cmd += ["--epochs", str(args.epochs), "--teacher", str(teacher), "--seed", str(seeds[0])]
        cmd += ["--grad-sync", mode, "--threads", str(half), "--out", str(work / f"two-{mode}")]
        wall = _run(cmd, env)
        runs[name] = (work / f"two-{mode}", wall, 2, seeds[0])
        two_names.append(name)

    results = {k: json.loads((v[0] / "results.json").read_text()) for k, v in runs.items()}
    first = next(iter(results.values()))
    monitor = first["config"]["monitor"]
    methods = list(first["students"])
    lines = [
        "# kdfast distill: one process against two (torch.distributed, gloo)",
        "",
        f"Device: {cpu_model()}, {os.cpu_count()} cores. {load_note()}",
        f"Data: {first['config']['data']['name']} ({first['config']['data']['users']} users, "
        f"{first['config']['data']['items']} items), protocol {args.protocol}; teacher BPR-MF "
        f"dim {args.teacher_dim} ({args.teacher_epochs} epochs), students dim {args.student_dim}, "
        f"{args.epochs} epochs each. kdfast {first['environment']['kdfast']}, torch "
        f"{first['environment']['torch']}, Python {first['environment']['python']}.",
        "",
        "Command: `python bench/distributed_distill.py " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        "| run | " + " | ".join(f"{m} s/epoch | {m} test {monitor}" for m in methods) + " |",
        "|---|" + "---|---|" * len(methods),
    ]
    for name, res in results.items():
        cells = []
        for m in methods:
            st = res["students"][m]
            cells += [f"{st['seconds_per_epoch']:.2f}", f"{st['test'][monitor]:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Tolerance (test " + monitor + "):", ""]
    one = [r for k, r in results.items() if k.startswith("1 process")]
    for m in methods:
        vals = [r["students"][m]["test"][monitor] for r in one]
        spread = max(vals) - min(vals)
        sd = statistics.pstdev(vals)
        for name in two_names:
            diff = abs(results[name]["students"][m]["test"][monitor] - vals[0])
            lines.append(
                f"- {m}, {name.split(', ')[-1]}: |2 processes - 1 process| at seed {seeds[0]} = "
                f"{diff:.4f}; one process over seeds {args.seeds}: spread {spread:.4f}, std "
                f"{sd:.4f}"
                + (" (within the spread)" if diff <= spread else " (OUTSIDE the spread)")
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
