"""CPU benchmark of the relaxed Plackett-Luce loss, forward + backward: kdfast cpp vs the eager reference
vs torch.compile(reference), for the score form and the embedding-gather form.

    python bench/cpu_plackett_luce.py --threads 2 [--threads-list 1,2] [--out bench/results/cpu_plackett_luce.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kdfast  # noqa: E402
from bench.common import cpu_model, load_note, markdown_table, write_result  # noqa: E402
from kdfast.ops.plackett_luce import reference as ref  # noqa: E402



def score_inputs(B, K, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, K, generator=g) * 2
    s[torch.arange(K)[None, :] >= torch.randint(K // 2, K + 1, (B, 1), generator=g)] = float("-inf")
    u = torch.randn(B, L, generator=g) * 2
    t = torch.randn(B, generator=g) + 5
    return s, u, t


def emb_inputs(B, K, L, N, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g) * 0.3
    e = torch.randn(N, d, generator=g) * 0.3
    ri = torch.randint(0, N, (B, K), generator=g)
    ri[torch.arange(K)[None, :] >= torch.randint(K // 2, K + 1, (B, 1), generator=g)] = -1
    ui = torch.randint(0, N, (B, L), generator=g)
    t = torch.randn(B, generator=g) + 5
    return q, e, ri, ui, t


def fwd_bwd(fn, leaves):
    def step():
        for x in leaves:
            x.grad = None
        fn().backward()
    return step


def interleaved_ms(steps, reps, warmup=1):
    """Median wall time (ms) of each step, the steps run in turn in every round, so that load from
    other processes on a shared machine hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_scores(B, K, L, reps, compile_ok=True):
    s, u, t = (x.requires_grad_() for x in score_inputs(B, K, L))
    impls = {
        "kdfast cpp": lambda: kdfast.plackett_luce_loss(s, u, log_tail=t, backend="cpp"),
        "eager reference": lambda: ref.plackett_luce_loss(s, u, t),
    }
    rows = []
    shape = f"B={B} K={K} L={L}"
    try:
        if not compile_ok:
            raise RuntimeError("skipped (--no-compile)")
        compiled = torch.compile(ref.plackett_luce_loss)
        t0 = time.perf_counter()
        fwd_bwd(lambda: compiled(s, u, t), [s, u, t])()
        note = f"compiled in {time.perf_counter() - t0:.0f} s"
        impls["torch.compile(reference)"] = lambda: compiled(s, u, t)
    except Exception as exc:  # noqa: BLE001 - report, do not die
        rows.append({"op": "plackett_luce_loss", "shape": shape, "impl": "torch.compile(reference)",
                     "ms": float("nan"), "note": f"not timed: {type(exc).__name__}: {str(exc)[:60]}"})
        note = ""
    times = interleaved_ms({name: fwd_bwd(fn, [s, u, t]) for name, fn in impls.items()}, reps)
    for name, ms in times.items():
        rows.append({"op": "plackett_luce_loss", "shape": shape, "impl": name, "ms": ms,
                     "note": note if name.startswith("torch.compile") else ""})
    return rows


def bench_emb(B, K, L, N, d, reps):
    q, e, ri, ui, t = emb_inputs(B, K, L, N, d)
    q.requires_grad_()
    e.requires_grad_()
    impls = {
        "kdfast cpp": lambda: kdfast.plackett_luce_loss_from_embeddings(q, e, ri, ui, log_tail=t, backend="cpp"),
        "eager reference": lambda: ref.plackett_luce_loss_from_embeddings(q, e, ri, ui, t),
    }
    shape = f"B={B} K={K} L={L} N={N} d={d}"
    times = interleaved_ms({name: fwd_bwd(fn, [q, e]) for name, fn in impls.items()}, reps)
    return [{"op": "plackett_luce_loss_from_embeddings", "shape": shape, "impl": name, "ms": ms, "note": ""}
            for name, ms in times.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threads-list", default="", help="comma-separated thread counts (overrides --threads)")
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--K", type=int, default=40)
    ap.add_argument("--L", type=int, default=400)
    ap.add_argument("--emb-B", type=int, default=1024)
    ap.add_argument("--N", type=int, default=2**17)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "cpu_plackett_luce.md"))
    args = ap.parse_args(argv)
    if not kdfast.backends()["cpp"][0]:
        sys.exit("the C++ extension is not built: python setup.py build_ext --inplace")
    thread_counts = [int(x) for x in args.threads_list.split(",")] if args.threads_list else [args.threads]
    rows = []
    for n in thread_counts:
        torch.set_num_threads(n)
        part = bench_scores(args.B, args.K, args.L, args.reps, compile_ok=not args.no_compile)
        part += bench_emb(args.emb_B, args.K, args.L, args.N, args.d, args.reps)
        for r in part:
            eager = next(x["ms"] for x in part if x["op"] == r["op"] and x["impl"] == "eager reference")
            r["speed-up vs eager"] = eager / r["ms"] if r["ms"] == r["ms"] else float("nan")
            r["threads"] = n
        rows += part
    header = (f"# CPU benchmark: relaxed Plackett-Luce loss (forward + backward)\n\n"
              f"CPU: {cpu_model()}; threads: {','.join(map(str, thread_counts))}; torch {torch.__version__}; "
              f"date {time.strftime('%Y-%m-%d')}. Median wall time of {args.reps} rounds, the implementations "
              f"taking turns within each round; {load_note()} "
              f"(other jobs slow every implementation alike).\n\n"
              f"Command: `python bench/cpu_plackett_luce.py "
              + (f"--threads-list {args.threads_list}" if args.threads_list else f"--threads {args.threads}")
              + "`\n\n")
    table = markdown_table(rows, ["op", "shape", "threads", "impl", "ms", "speed-up vs eager", "note"])
    write_result(args.out, header + table)


if __name__ == "__main__":
    main()
