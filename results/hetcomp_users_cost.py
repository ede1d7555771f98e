"""What HetComp's per-step user count costs: seconds per epoch with every unique user of each batch
(max_users=None, the authors' choice and kdfast's default) against a cap (max_users=M), in phase 1
(the set-level loss with the catalog tail) and phase 2 (listwise), on the trajectories' split.

    python results/hetcomp_users_cost.py --data citeulike-t --trajectories T.pt --caps none,64 \\
        --epochs 2 --student-dim 20 --threads 2

Phase 1 is what a HetComp run starts in (every trajectory checkpoint); phase 2 is timed by giving
each teacher its final checkpoint only (HetComp then starts in phase 2), on the same data, student
size and batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdfast import experiment  # noqa: E402
from kdfast.methods.hetcomp import load_trajectories  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="citeulike-t")
    p.add_argument("--trajectories", nargs="+", required=True)
    p.add_argument("--caps", default="none,64")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--student-dim", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = experiment.DataSpec(data=args.data, protocol="full")
    dataset, split = experiment.load_split(spec)
    teachers = [
        t
        for f in args.trajectories
        for t in load_trajectories(
            f, train=split.train, n_users=split.n_users, n_items=split.n_items
        )
    ]
    first = next(t for t in teachers if "checkpoints" in t)
    u, i = first["checkpoints"][-1]
    teacher = experiment.Teacher(u, i, {"model": first["name"]}, loaded=True)
    train = experiment.TrainSpec(
        epochs=args.epochs, eval_every=args.epochs, weight_decay=1e-5, progress=False
    )
    rows = []
    for cap in args.caps.split(","):
        max_users = None if cap == "none" else int(cap)
        for phase in (1, 2):
            finals = [
                {k: v[-1:] if k in ("checkpoints", "knowledge") else v for k, v in t.items()}
                for t in teachers
            ]
            opts = {"trajectories": teachers if phase == 1 else finals, "max_users": max_users}
            t0 = time.perf_counter()
            r = experiment.train_student(
                split, teacher, "hetcomp", opts, student_dim=args.student_dim, train=train, log=None
            )
            rows.append(
                {
                    "max_users": cap,
                    "phase": phase,
                    "seconds_per_epoch": r["seconds_per_epoch"],
                    "setup_seconds": r["setup_seconds"],
                    "wall_seconds": time.perf_counter() - t0,
                    "status": [h.get("method") for h in r["history"]],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "data": dataset.describe(),
        "threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "student_dim": args.student_dim,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
