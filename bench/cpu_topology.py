"""CPU benchmark of the topology losses; writes bench/results/cpu_topology.md.

FTD, N=8192, d_t=200, d_s=20: kdfast cpp (Gram rewrite) vs the eager direct N x N formula vs
torch.compile of it. HTD entity level, N=16384, K=30 groups (uniform random), teacher-cosine filter
on: kdfast cpp (tiled, never N x N) vs the eager masked N x N formula. Forward + backward (student
gradient), best-of-reps wall time (the machine may be shared: figures are indicative).

    python bench/cpu_topology.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kdfast  # noqa: E402
from bench.common import cpu_model, markdown_table  # noqa: E402
from kdfast.ops.topology import reference as ref  # noqa: E402



def best_ms(fn, leaves, reps):
    def step():
        for x in leaves:
            x.grad = None
        fn().backward()
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "cpu_topology.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not kdfast.backends()["cpp"][0]:
        sys.exit("the C++ extension is not built: python setup.py build_ext --inplace")
    g = torch.Generator().manual_seed(0)
    rows = []

    n, dt, ds = 8192, 200, 20
    t = torch.randn(n, dt, generator=g)
    s = torch.randn(n, ds, generator=g, requires_grad=True)
    shape = f"N={n} dt={dt} ds={ds}"
    impls = [("kdfast cpp", lambda: kdfast.topology_loss(t, s, backend="cpp"), args.reps),
             ("eager direct N x N", lambda: ref.topology_loss(t, s), args.reps)]
    if not args.no_compile:
        try:
            comp = torch.compile(ref.topology_loss)
            comp(t, s).backward()
            impls.append(("torch.compile(direct)", lambda: comp(t, s), args.reps))
        except Exception as exc:  # noqa: BLE001
            rows.append({"op": "FTD", "shape": shape, "impl": "torch.compile(direct)", "ms": float("nan"),
                         "note": f"compile failed: {type(exc).__name__}"})
    ftd = {}
    for name, fn, reps in impls:
        ftd[name] = best_ms(fn, [s], reps)
        print(name, ftd[name], flush=True)
    for name, ms in ftd.items():
        rows.append({"op": "FTD", "shape": shape, "impl": name, "ms": ms,
                     "speed-up of cpp": ms / ftd["kdfast cpp"],
                     "extra memory": "O(d^2) + grads" if "cpp" in name else "N x N matrices"})

    n, k = 16384, 30
    t = torch.randn(n, dt, generator=g)
    s = torch.randn(n, ds, generator=g, requires_grad=True)
    groups = torch.randint(0, k, (n,), generator=g)
    shape = f"N={n} K={k} dt={dt} ds={ds}"
    htd = {}
    for name, fn in (("kdfast cpp (filter on)",
                      lambda: kdfast.grouped_topology_loss(t, s, groups, k, backend="cpp")),
                     ("kdfast cpp (filter off, per-group Gram)",
                      lambda: kdfast.grouped_topology_loss(t, s, groups, k, teacher_cos_filter=False, backend="cpp")),
                     ("eager masked N x N (filter on)",
                      lambda: ref.grouped_topology_loss(t, s, groups, True)[0])):
        htd[name] = best_ms(fn, [s], args.reps if "eager" not in name else max(1, args.reps - 1))
        print(name, htd[name], flush=True)
    base = htd["kdfast cpp (filter on)"]
    for name, ms in htd.items():
        rows.append({"op": "HTD entity level", "shape": shape, "impl": name, "ms": ms,
                     "speed-up of cpp": ms / base,
                     "extra memory": "N x N matrices" if "eager" in name else "O(N d)"})

    head = (f"# CPU benchmark: topology losses (FTD, HTD entity level)\n\n"
            f"- CPU: {cpu_model()}\n- threads: {args.threads}\n- torch {torch.__version__}\n"
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
            f"- load average (1 min) at start: {load:.1f} on {os.cpu_count()} logical CPUs\n"
            f"- forward + backward (student gradient), best of {args.reps} after a warm-up (other jobs, see the load "
            f"average, slow every implementation)\n- command: `python bench/cpu_topology.py --threads {args.threads}`\n\n")
    table = markdown_table(rows, ["op", "shape", "impl", "ms", "speed-up of cpp", "extra memory"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(head + table)
    print(head + table)


if __name__ == "__main__":
    main()
