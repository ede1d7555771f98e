"""kdfast.distributed.topk_scores on this machine's CPUs: 1 process against several (gloo), both
layouts, threads per process = CPUs / processes, so every run uses the same cores.

    PYTHONPATH=. python bench/distributed_topk.py --size 20000 100000 64 -k 100 --procs 1,2 \\
        --out bench/results/intel-xeon-2cpu/distributed_topk.md

Each configuration runs in fresh processes (torch.multiprocessing spawn, a file:// rendezvous):
every rank builds the same seeded N(0, 1) queries and keys and takes its blocks (queries: its
block of queries, all keys; keys: its block of queries and its block of keys), then times --reps
calls (after a barrier; a call's time is the slowest rank's). The rankings of every configuration
are checked equal to the one-process op (the 1-process "queries" run is kdfast.topk_scores itself).
Bytes moved per call are what the keys layout's collectives carry (computed, not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench import harness  # noqa: E402


def _worker(rank, world, init_file, cfg, out_dir):
    import torch.distributed as dist

    import kdfast.distributed as kd

    torch.set_num_threads(cfg["threads"])
    kd.init("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout_s=3600)
    n_q, n_k, d = cfg["size"]
    k = cfg["k"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    q, keys = torch.randn(n_q, d, generator=gen), torch.randn(n_k, d, generator=gen)
    r0, r1 = kd.block_range(n_q, rank, world)
    k0, k1 = kd.block_range(n_k, rank, world)
    rows = []
    for layout in cfg["layouts"]:
        kk = keys if layout == "queries" else keys[k0:k1].clone()
        times = []
        for _ in range(cfg["reps"]):
            dist.barrier()
            t0 = time.perf_counter()
            got = kd.topk_scores(q[r0:r1], kk, k, layout=layout, backend=cfg["backend"])
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t))
        np.save(os.path.join(out_dir, f"{layout}_w{world}_r{rank}.npy"), got.indices.numpy())
        rows.append({"layout": layout, "times": times})
    if rank == 0:
        harness.write_json(os.path.join(out_dir, f"times_w{world}.json"), rows)
    dist.destroy_process_group()


def _bytes_moved(layout, world, n_q, d, k):
    """(bytes every rank receives per call) in the keys layout's two large collectives: the
    queries' all_gather and the partial lists' all_to_all (8-byte rank keys)."""
    if layout == "queries" or world == 1:
        return 0
    gather_q = n_q * (world - 1) // world * d * 4
    partials = n_q // world * k * 8 * (world - 1)
    return gather_q + partials


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", nargs=3, type=int, default=(20000, 100000, 64),
                   metavar=("N_Q", "N_K", "D"))  # fmt: skip
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--procs", default="1,2", help="process counts (default 1,2)")
    p.add_argument("--layouts", default="queries,keys")
    p.add_argument("--reps", type=int, default=1, help="timed calls per layout (default 1)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores shared by the ranks")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results .md (and .json beside it)")
    args = p.parse_args(argv)
    procs = [int(x) for x in args.procs.split(",")]
    layouts = args.layouts.split(",")
    n_q, n_k, d = args.size
    results = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for world in procs:
            cfg = dict(size=args.size, k=args.k, layouts=layouts, reps=args.reps, seed=args.seed,
                       threads=max(1, args.cpus // world), backend=args.backend)  # fmt: skip
            print(f"{world} process(es), {cfg['threads']} thread(s) each ...", flush=True)
            init = os.path.join(tmp, f"init{world}")
            mp.start_processes(_worker, args=(world, init, cfg, tmp), nprocs=world,
                               start_method="spawn")  # fmt: skip
            with open(os.path.join(tmp, f"times_w{world}.json")) as f:
                rows = json.load(f)
            for r in rows:
                got = np.concatenate(
                    [np.load(os.path.join(tmp, f"{r['layout']}_w{world}_r{j}.npy"))
                     for j in range(world)]
                )  # fmt: skip
                ref = np.load(os.path.join(tmp, f"{layouts[0]}_w{procs[0]}_r0.npy"))
                results.append({
                    "processes": world,
                    "threads/process": cfg["threads"],
                    "layout": r["layout"],
                    "s": float(np.median(r["times"])),
                    "all_s": " ".join(f"{t:.2f}" for t in r["times"]),
                    "MB_received/rank": _bytes_moved(r["layout"], world, n_q, d, args.k) / 1e6,
                    "equal": bool(np.array_equal(got, ref)),
                })  # fmt: skip
                print(results[-1], flush=True)
    base = {r["layout"]: r["s"] for r in results if r["processes"] == procs[0]}
    for r in results:
        r["speed-up"] = base[r["layout"]] / r["s"] if r["layout"] in base else None
    env = harness.environment("cpu", threads=f"{args.cpus} cores shared by the processes")
    command = "PYTHONPATH=. python bench/distributed_topk.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    intro = [
        "",
        f"kdfast.distributed.topk_scores, {n_q} queries x {n_k} keys x d = {d}, k = {args.k}, "
        "float32, gloo, processes started with torch.multiprocessing spawn. s: the median over "
        "the timed calls of the slowest rank's time; speed-up: against the first process count; "
        "equal: the ranking equals the one-process op's. MB_received/rank: what the keys "
        "layout's queries all_gather and partial-list all_to_all deliver to each rank (computed).",
    ]
    if load_start > 0.5 * (os.cpu_count() or 1):
        intro.append(
            f"The machine was shared with other jobs: load average (1 min) {load_start:.1f} at the "
            f"start on {os.cpu_count()} CPUs, so these timings are under load (every configuration "
            "alike, but noisy); rerun with the command above on an idle machine."
        )
    if args.out:
        harness.write_results(
            args.out,
            "Sharded top-K: 1 process vs several (CPU, gloo)",
            env,
            results,
            ["processes", "threads/process", "layout", "s", "speed-up", "all_s",
             "MB_received/rank", "equal"],
            intro=intro,
            command=command,
        )  # fmt: skip
    else:
        print(harness.markdown_table(results, list(results[0])))
    return 0 if all(r["equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
