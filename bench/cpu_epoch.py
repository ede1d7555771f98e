"""CPU benchmark of a training epoch per KD method: the seconds an epoch of `kdfast distill` costs with
each method against the plain BPR epoch (no KD), on the same data, student and batch order.

    python bench/cpu_epoch.py --data citeulike-t --teacher runs/loo/teacher.pt --methods none,rrd,ir-rrd \
        --threads-list 1,2 [--epochs 3 --rounds 3] [--out bench/results/cpu_epoch.md]

Each round trains a fresh student for --epochs epochs with every method in turn (the methods take turns,
so that load from elsewhere hits them alike); the figure is the median over rounds of the mean training
seconds per epoch (the trainer's own clock: sampling, the per-epoch method work and the steps;
validation excluded). The method's one-off set-up (the teacher's top-N lists) is reported apart.
Without --teacher a teacher is trained first for --teacher-epochs epochs (its quality does not change
the cost of an epoch much, but the committed results name the teacher they used).
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
from bench.harness import cpu_model, load_note, markdown_table, write_result  # noqa: E402
from kdfast.data import datasets, splits  # noqa: E402
from kdfast.methods.base import method_class  # noqa: E402
from kdfast.models import BPRMF, load_teacher  # noqa: E402
from kdfast.train import Trainer  # noqa: E402


def load_split(args):
    data = datasets.load(args.data)
    return data, splits.make_split(data, args.protocol, seed=args.split_seed)


def get_teacher(args, split):
    if args.teacher:
        user, item, meta = load_teacher(args.teacher)
        if user.shape[0] != split.n_users or item.shape[0] != split.n_items:
            sys.exit(f"--teacher {args.teacher} has {user.shape[0]} users / {item.shape[0]} items; the split has "
                     f"{split.n_users} / {split.n_items}")
        return user, item, f"{os.path.basename(args.teacher)} (dim {user.shape[1]})"
    model = BPRMF(split.n_users, split.n_items, args.teacher_dim, generator=torch.Generator().manual_seed(0))
    Trainer(model, split, epochs=args.teacher_epochs, eval_every=args.teacher_epochs, progress=False, log=None).fit()
    with torch.no_grad():
        user, item = model.embeddings()
    return user.detach(), item.detach(), f"BPR-MF dim {args.teacher_dim}, trained {args.teacher_epochs} epochs here"


def one_run(name, split, teacher, args, seed):
    model = BPRMF(split.n_users, split.n_items, args.student_dim, generator=torch.Generator().manual_seed(seed))
    method, setup = None, 0.0
    if name != "none":
        base, _, backend = name.partition("@")  # "rrd@torch": the method on the reference backend
        cls, opts = method_class(base)
        if backend:
            opts["backend"] = backend
        t0 = time.perf_counter()
        method = cls.build(teacher[0], teacher[1], split.train, args.student_dim,
                           generator=torch.Generator().manual_seed(seed + 1), **opts)
        setup = time.perf_counter() - t0
    trainer = Trainer(model, split, method=method, epochs=args.epochs, eval_every=args.epochs, patience=10**6,
                      seed=seed, progress=False, log=None)
    return trainer.fit()["seconds_per_epoch"], setup


def _shown_args(argv):
    """The command line, with the teacher file named by its base name (no machine paths in results)."""
    args = list(argv if argv is not None else sys.argv[1:])
    for i, a in enumerate(args):
        if i and args[i - 1] == "--teacher":
            args[i] = os.path.basename(a)
        elif a.startswith("--teacher="):
            args[i] = "--teacher=" + os.path.basename(a.split("=", 1)[1])
    return args


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic", help="'synthetic', 'citeulike-t' or a file (as kdfast distill)")
    ap.add_argument("--protocol", default="loo", choices=("loo", "full"))
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--teacher", default=None, help="a saved teacher file (kdfast distill's teacher.pt)")
    ap.add_argument("--teacher-dim", type=int, default=200)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--student-dim", type=int, default=20)
    ap.add_argument("--methods", default="none,rrd,ir-rrd",
                    help="comma-separated; NAME@BACKEND builds the method with backend=BACKEND (e.g. rrd@torch)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads-list", default="1,2")
    ap.add_argument("--out", default=None, help="write the markdown table here (default: print only)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" not in methods:
        methods.insert(0, "none")
    data, split = load_split(args)
    teacher = get_teacher(args, split)
    rows = []
    for n in [int(x) for x in args.threads_list.split(",")]:
        torch.set_num_threads(n)
        per = {m: [] for m in methods}
        setups = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:
                sec, setup = one_run(m, split, teacher, args, seed=r)
                per[m].append(sec)
                setups[m].append(setup)
        base = statistics.median(per["none"])
        for m in methods:
            sec = statistics.median(per[m])
            rows.append({"threads": n, "method": m, "s/epoch": sec, "x no-KD": sec / base,
                         "set-up s": statistics.median(setups[m]) if m != "none" else float("nan"),
                         "runs (s/epoch)": ", ".join(f"{x:.3f}" for x in per[m])})
    header = (f"# CPU benchmark: seconds per training epoch, per KD method\n\n"
              f"Data: {data.name} ({split.n_users} users, {split.n_items} "
              f"items, {split.n_train} training interactions), protocol {args.protocol}; student BPR-MF dim "
              f"{args.student_dim}, batch 1024; teacher: {teacher[2]}. Method defaults (docs/METHODS.md); "
              f"NAME@torch: the method on the reference backend (tensor samplers, eager Plackett-Luce).\n"
              f"CPU: {cpu_model()}; torch {torch.__version__}; kdfast backends: "
              f"{', '.join(k for k, v in kdfast.backends().items() if v[0])}; date {time.strftime('%Y-%m-%d')}; "
              f"{args.rounds} rounds x {args.epochs} epochs per method, methods taking turns; median of the "
              f"rounds' mean epoch time; {load_note()}.\n\n"
              f"Command: `python bench/cpu_epoch.py {' '.join(_shown_args(argv))}`\n\n")
    table = markdown_table(rows, ["threads", "method", "s/epoch", "x no-KD", "set-up s", "runs (s/epoch)"])
    write_result(args.out, header + table)


if __name__ == "__main__":
    main()
