"""CPU benchmark of kdfast.topk_scores: the C++ kernel vs the PyTorch reference vs torch.compile of it.

    python bench/cpu_topk.py                 # the issue's size: 20000 x 100000 x 64, k = 100, 2 threads
    python bench/cpu_topk.py --small         # a quick run (2000 x 20000 x 64)

Each implementation runs in a fresh subprocess (same seeded inputs, `--threads` intra-op threads): one
warm-up call (for torch.compile this includes compilation), then the median wall time of `--reps`
calls. Peak extra memory is the growth of the process's peak resident set size (VmHWM in
/proc/self/status, reset through /proc/self/clear_refs after the warm-up) over the resident size just
before the timed calls: everything the calls allocate, the output included, measured by the OS (the
numbers include allocator slack; tracemalloc would not see torch's allocations). The outputs are
compared with the reference's (identical indices, largest value difference). Prints a markdown table
and writes it, with the CPU model, torch version, date and thread count, to bench/results/cpu_topk.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import cpu_model  # noqa: E402
IMPLS = ("cpp", "torch", "torch.compile")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(n_q, n_k, d, excl, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, d, generator=gen)
    keys = torch.randn(n_k, d, generator=gen)
    indptr = torch.arange(n_q + 1, dtype=torch.int64) * excl
    indices = torch.randint(0, n_k, (n_q * excl,), generator=gen)
    return q, keys, indptr, indices


def worker(args):
    """One implementation in this process; prints one JSON line with its timings and memory."""
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    from kdfast.ops.topk.reference import topk_scores as reference
    q, keys, indptr, indices = make_inputs(args.n_q, args.n_k, args.d, args.excl)
    note = ""
    if args.worker == "cpp":
        from kdfast.ops.topk.cpu import topk_scores as fn
        note = "isa " + __import__("kdfast")._backend.ext().topk_isa("auto")
    elif args.worker == "torch":
        fn = reference
    else:
        fn = torch.compile(reference)
    t0 = time.perf_counter()
    out = fn(q, keys, args.k, indptr, indices)
    warm = time.perf_counter() - t0
    del out
    rss0 = _status_kb("VmRSS")
    if not _reset_peak():
        note += " (peak not resettable: VmHWM since start)"
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = fn(q, keys, args.k, indptr, indices)
        times.append(time.perf_counter() - t0)
        if len(times) < args.reps:
            del out
    peak_mb = (_status_kb("VmHWM") - rss0) / 1024
    np.savez(args.result, values=out[0].numpy(), indices=out[1].numpy())
    print(json.dumps({"impl": args.worker, "s": statistics.median(times), "runs": len(times),
                      "first_call_s": warm, "peak_extra_MB": peak_mb, "note": note.strip()}))


def run_impl(impl, args, result_path):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--result", result_path,
           "--n-q", str(args.n_q), "--n-k", str(args.n_k), "-d", str(args.d), "-k", str(args.k),
           "--excl", str(args.excl), "--threads", str(args.threads),
           "--reps", str(args.reps if impl == "cpp" else args.ref_reps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"impl": impl, "note": f"failed: {tail[:120]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="2000 x 20000 x 64 instead of the issue's size")
    ap.add_argument("--n-q", type=int, default=None)
    ap.add_argument("--n-k", type=int, default=None)
    ap.add_argument("-d", type=int, default=64)
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--excl", type=int, default=50, help="excluded keys per query (random; default 50)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed calls of the cpp kernel (median)")
    ap.add_argument("--ref-reps", type=int, default=2, help="timed calls of the references (slow)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cpu_topk.md"))
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.n_q = args.n_q or (2000 if args.small else 20000)
    args.n_k = args.n_k or (20000 if args.small else 100000)
    if args.worker:
        return worker(args)

    import numpy as np
    import torch
    impls = [i for i in args.impls.split(",") if i]
    shape = f"{args.n_q} x {args.n_k} x {args.d}, k={args.k}, {args.excl} excluded/query"
    print(f"top-k benchmark: {shape}, {args.threads} threads", flush=True)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in impls:
            path = os.path.join(tmp, impl.replace(".", "_") + ".npz")
            row = run_impl(impl, args, path)
            if os.path.exists(path):
                with np.load(path) as z:
                    results[impl] = (z["values"], z["indices"])
            print(" ", row, flush=True)
            rows.append(row)
    ref = results.get("torch")
    base = {r["impl"]: r.get("s") for r in rows}
    table = ["| impl | median s | runs | first call s | peak extra MB | vs torch | vs torch.compile | same indices as torch | max abs value diff | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("s")
        speed = f"{base['torch'] / s:.1f}x" if s and base.get("torch") else ""
        speed_c = f"{base['torch.compile'] / s:.1f}x" if s and base.get("torch.compile") else ""
        same = diff = ""
        if ref is not None and r["impl"] in results:
            v, i = results[r["impl"]]
            same = f"{(i == ref[1]).mean() * 100:.3f}%"
            fin = np.isfinite(ref[0])
            diff = f"{np.abs(v[fin] - ref[0][fin]).max():.2e}" if fin.any() else "0"
        fmt = lambda x, f: (f % x) if isinstance(x, (int, float)) else ""  # noqa: E731
        table.append(f"| {r['impl']} | {fmt(s, '%.3f')} | {r.get('runs', '')} | {fmt(r.get('first_call_s'), '%.2f')} | "
                     f"{fmt(r.get('peak_extra_MB'), '%.0f')} | {speed} | {speed_c} | {same} | {diff} | {r.get('note', '')} |")
    score_gb = args.n_q * args.n_k * 4 / 1e9
    header = [
        "# kdfast.topk_scores on the CPU",
        "",
        f"- shape: {shape} (the full float32 score matrix would be {score_gb:.1f} GB)",
        f"- CPU: {cpu_model()}, {args.threads} threads (torch.set_num_threads / OMP_NUM_THREADS)",
        f"- torch {torch.__version__}, Python {platform.python_version()}, date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `python bench/cpu_topk.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
        f"- load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(other processes on the machine slow every row alike)",
        "- each implementation in a fresh process; median of the timed calls after one warm-up call;",
        "  peak extra MB = growth of the peak RSS (VmHWM) over the RSS before the timed calls (output included).",
        "",
    ]
    text = "\n".join(header + table) + "\n"
    print()
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
