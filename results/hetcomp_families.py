"""HetComp over teachers of several families (trajectory files of results/hetcomp_teachers.py):
each teacher's own metrics and the ensemble's, then the no-KD student and the HetComp student at
each student dimension, on the split the trajectories were made on.

    python results/hetcomp_families.py --data citeulike-t --trajectories T1.pt T2.pt ... \\
        --student-dims 20,10 --epochs 200 --weight-decay 1e-5 --max-users 64 --out FILE.json

Teachers and ensemble are scored on the test part exactly as students are (all items but the
training and validation items ranked, Recall/NDCG/Precision@K); the ensemble's list is HetComp's
(kdfast.methods.hetcomp.ensemble_top of the final checkpoints' lists, importance exp(-rank / 10)).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kdfast import experiment, metrics
from kdfast._core.csr import concat_rows, select_rows
from kdfast.methods.hetcomp import ensemble_top, load_trajectories
from kdfast.ops.topk import topk_scores


def _test_metrics(top, split):
    """Full-ranking test metrics of [U, k] lists (ranked with train and valid items excluded)."""
    truth = split.test
    users = torch.nonzero(truth[0][1:] > truth[0][:-1]).flatten()
    return metrics.full_metrics(top[users], select_rows(*truth, users), split.n_items)


def _drop(top, csr, k):
    """Each row of `top` [U, K] without the items of the CSR pair's row (order kept), the first k,
    -1 padding."""
    from kdfast._core.csr import has_pair, pair_keys

    keys = pair_keys(*csr, 1 << 40)
    rows = torch.arange(top.shape[0]).unsqueeze(1).expand_as(top)
    hit = has_pair(keys, rows * (1 << 40) + top.clamp_min(0)) & (top >= 0)
    kept = torch.where(hit, torch.full_like(top, -1), top)
    order = torch.sort((kept < 0).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(kept, 1, order)[:, :k]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="citeulike-t")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--trajectories", nargs="+", required=True)
    p.add_argument("--student-dims", default="20,10")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument(
        "--max-users",
        type=lambda v: None if v.lower() == "none" else int(v),
        default=64,
        help="HetComp's per-step user cap; none: every unique user of each batch (the authors')",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-none", action="store_true", help="no no-KD student")
    p.add_argument(
        "--methods",
        default="none,hetcomp",
        help="the students at each dim: none, hetcomp, or any single-teacher method (rrd, dcd, "
        "...), which distils the FIRST trajectory's final checkpoint with its default options",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = experiment.DataSpec(data=args.data, protocol="full", split_seed=args.split_seed)
    dataset, split = experiment.load_split(spec)
    teachers = [
        t
        for f in args.trajectories
        for t in load_trajectories(
            f, train=split.train, n_users=split.n_users, n_items=split.n_items
        )
    ]
    report = {"data": dataset.describe(), "split": split.describe(), "teachers": {}}
    # each teacher's final checkpoint and the ensemble, ranked for the test part
    exclude = concat_rows(split.train, split.valid)
    finals = []
    for t in teachers:
        if "checkpoints" in t:
            u, i = t["checkpoints"][-1]
            _, top = topk_scores(u, i, 100, exclude=exclude)
        else:  # a teacher saved as lists (no tables): its final list without the valid items
            top = _drop(t["knowledge"][-1][0], split.valid, 100)
        finals.append(top)
        report["teachers"][t["name"]] = {
            "epochs": t.get("epochs"),
            "test": _test_metrics(top[:, :50], split),
        }
        print(t["name"], {k: round(v, 4) for k, v in report["teachers"][t["name"]]["test"].items()})
    ens = ensemble_top(finals, 50, split.n_items, 10.0)
    report["ensemble"] = {"test": _test_metrics(ens, split)}
    print("ensemble", {k: round(v, 4) for k, v in report["ensemble"]["test"].items()}, flush=True)
    train = experiment.TrainSpec(
        epochs=args.epochs, weight_decay=args.weight_decay, eval_every=5, seed=args.seed
    )
    first = next(t for t in teachers if "checkpoints" in t)
    u, i = first["checkpoints"][-1]  # (HetComp reads the trajectories, not this teacher)
    teacher = experiment.Teacher(u, i, {"model": first["name"]}, loaded=True)
    keep = ("best_epoch", "epochs_run", "seconds_per_epoch", "valid", "test")
    report["students"] = {}
    for d in (int(x) for x in args.student_dims.split(",")):
        names = [m for m in args.methods.split(",") if not (m == "none" and args.skip_none)]
        for name in names:
            opts = {}
            if name == "hetcomp":
                opts = {"trajectories": list(args.trajectories), "max_users": args.max_users}
            t0 = time.perf_counter()
            r = experiment.train_student(
                split, teacher, name, opts, student_dim=d, train=train, log=print
            )
            key = f"{name}_d{d}"
            report["students"][key] = {k: r[k] for k in keep}
            report["students"][key]["wall_seconds"] = round(time.perf_counter() - t0)
            if name == "hetcomp":
                report["students"][key]["history_status"] = [
                    h.get("method") for h in r["history"] if h.get("method")
                ]
            print(key, {k: round(v, 4) for k, v in r["test"].items()}, flush=True)
            with open(args.out, "w") as f:  # after every student: a stopped run keeps its rows
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
