"""CPU benchmark: where the time of an RRD epoch goes, set against the budget of 1.5x a no-KD epoch.

    python bench/cpu_rrd_budget.py --data citeulike-t --teacher runs/loo/teacher.pt \
        --threads-list 1,2 [--out bench/results/<device>/rrd_budget.md]

An RRD step evaluates the relaxed Plackett-Luce loss of K + L = 80 sampled items for every distinct
user of the batch (about 900 of the 1024 pairs' users on CiteULike-t): about 74 thousand user-item
scores, against the 2 x 1024 of the BPR loss. This script measures, per training step (the trainer's
batch order, fresh per-epoch samples):
  - the whole no-KD and RRD epochs (kdfast's Trainer), so the budget: 0.5 x the no-KD epoch;
  - the per-epoch resampling (spread over the epoch's steps);
  - the fused loss kernel's forward (with the row gradients) and backward (the item-gradient
    scatter);
  - a floor for touching the data at all: torch.index_select of the step's sampled item rows (the
    rows are read once and copied, nothing computed), and of the user rows.
The kernel and floor timings run between sweeps over a buffer as large as the dense Adam state of
the student (parameters, gradients, two moments), as in training, where that sweep evicts the tables
from the private caches every step. Each figure is the median over the epoch's steps of one call.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kdfast  # noqa: E402
from bench.cpu_epoch import _shown_args, get_teacher, load_split, one_run  # noqa: E402
from bench.harness import cpu_model, load_note, markdown_table, write_result  # noqa: E402
from kdfast.csr import row_ids  # noqa: E402
from kdfast.methods.rrd import RRD  # noqa: E402
from kdfast.ops.plackett_luce import cpu as cpp_pl  # noqa: E402


def _median_ms(fn, before, reps):
    times = []
    for r in range(reps):
        before(r)
        t0 = time.perf_counter()
        fn(r)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def step_parts(split, teacher, args):
    """Median ms per step of the parts of an RRD step, over one epoch's batches."""
    g = torch.Generator().manual_seed(0)
    d = args.student_dim
    user = torch.randn(split.n_users, d, generator=g) * 0.1
    item = torch.randn(split.n_items, d, generator=g) * 0.1
    method = RRD.build(
        teacher.user, teacher.item, split.train, d, generator=torch.Generator().manual_seed(1)
    )
    side = method.user_side
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        method.start_epoch(0, 1, user, item)
    resample_s = (time.perf_counter() - t0) / reps
    indptr, items = split.train
    users_all = row_ids(indptr)
    users = users_all[torch.randperm(users_all.numel(), generator=g)]
    n_steps = math.ceil(users.numel() / args.batch_size)
    batches = [
        torch.unique(users[b * args.batch_size : (b + 1) * args.batch_size]) for b in range(n_steps)
    ]
    # the dense Adam state of the student: parameters, gradients, two moments
    sweep = torch.zeros(4 * (split.n_users + split.n_items) * d)

    def evict(_r):
        sweep.add_(1.0)

    fwd = [None] * n_steps

    def forward(r):
        fwd[r] = cpp_pl.emb_forward(
            user, item, side.interesting, side.uninteresting, None, batches[r], True
        )

    def backward(r):
        ones = torch.ones(batches[r].numel())
        _, d_ranked, d_unranked, _, grad_query = fwd[r]
        cpp_pl.emb_backward(
            ones,
            user,
            item,
            side.interesting,
            side.uninteresting,
            batches[r],
            d_ranked,
            d_unranked,
            grad_query,
        )

    ids = [torch.cat([side.interesting[b], side.uninteresting[b]], 1).flatten() for b in batches]
    out = torch.empty(max(i.numel() for i in ids), d)
    parts = {
        "fused loss forward (scores, loss, row gradients)": _median_ms(forward, evict, n_steps),
        "fused loss backward (item-gradient scatter)": _median_ms(backward, evict, n_steps),
        "floor: index_select of the sampled item rows": _median_ms(
            lambda r: torch.index_select(item, 0, ids[r], out=out[: ids[r].numel()]), evict, n_steps
        ),
    }
    return (
        resample_s,
        n_steps,
        parts,
        sum(i.numel() for i in ids) / n_steps,
        statistics.mean(b.numel() for b in batches),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--protocol", default="loo", choices=("loo", "full"))
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--teacher-dim", type=int, default=200)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--student-dim", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads-list", default="1,2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not kdfast.backends()["cpp"][0]:
        sys.exit("the cpp backend is not available: build the extension first")
    data, split, spec = load_split(args)
    teacher, about = get_teacher(args, data, split, spec)
    rows = []
    for n in [int(x) for x in args.threads_list.split(",")]:
        torch.set_num_threads(n)
        epoch = {
            m: statistics.median(
                one_run(m, split, teacher, args, seed=r)[0] for r in range(args.rounds)
            )
            for m in ("none", "rrd")
        }
        resample_s, n_steps, parts, pairs, n_users = step_parts(split, teacher, args)
        budget_ms = 0.5 * epoch["none"] / n_steps * 1e3
        entries = [
            ("no-KD step (whole epoch / steps)", epoch["none"] / n_steps * 1e3),
            ("RRD step (whole epoch / steps)", epoch["rrd"] / n_steps * 1e3),
            ("RRD budget: 0.5 x the no-KD step", budget_ms),
            ("RRD extra: RRD step - no-KD step", (epoch["rrd"] - epoch["none"]) / n_steps * 1e3),
            ("per-epoch resampling / steps", resample_s / n_steps * 1e3),
        ]
        entries += list(parts.items())
        for name, ms in entries:
            rows.append(
                {"threads": n, "part": name, "ms/step": ms, "% of budget": 100 * ms / budget_ms}
            )
    header = (
        f"# CPU benchmark: an RRD step's parts against the 1.5x budget\n\n"
        f"Data: {data.name} ({split.n_users} users, {split.n_items} items, "
        f"{split.n_train} training "
        f"interactions), protocol {args.protocol}; student BPR-MF dim {args.student_dim}, batch "
        f"{args.batch_size} ({n_steps} steps per epoch, {n_users:.0f} distinct users and "
        f"{pairs:.0f} "
        f"sampled user-item pairs per step on average); RRD defaults (N=500, K=40, L=40, T=10); "
        f"teacher: {about}.\n"
        f"CPU: {cpu_model()}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}; "
        f"epochs: median of {args.rounds} runs of {args.epochs} epochs (kdfast's Trainer); "
        f"parts: median over one epoch's "
        f"steps, each call after a sweep over a buffer the size of the student's Adam state; "
        f"{load_note()}.\n\n"
        f"Command: `python bench/cpu_rrd_budget.py {' '.join(_shown_args(argv))}`\n\n"
    )
    table = markdown_table(rows, ["threads", "part", "ms/step", "% of budget"])
    write_result(args.out, header + table)


if __name__ == "__main__":
    main()
