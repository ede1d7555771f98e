"""CPU benchmark of a training epoch per KD method: the seconds an epoch of `kdfast distill` costs
with each method against the plain BPR epoch (no KD), on the same data, student and batch order.

    python bench/cpu_epoch.py --data citeulike-t --teacher runs/loo/teacher.pt \
        --methods none,rrd,ir-rrd --threads-list 1,2 [--epochs 3 --rounds 3] \
        [--out bench/results/<device>/epoch.md]

Each round trains a fresh student for --epochs epochs with every method in turn (the methods take
turns, so that load from elsewhere hits them alike); the figure is the median over rounds of the
mean training seconds per epoch (the trainer's own clock: sampling, the per-epoch method work and
the steps; validation excluded). The method's one-off set-up (the teacher's top-N lists) is reported
apart. Without --teacher a teacher is trained first for --teacher-epochs epochs (its quality does
not change the cost of an epoch much, but the committed results name the teacher they used).
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
from kdfast import experiment  # noqa: E402


def load_split(args):
    """(data, split, data spec) through kdfast's pipeline, as kdfast distill makes them."""
    spec = experiment.DataSpec(data=args.data, protocol=args.protocol, split_seed=args.split_seed)
    return (*experiment.load_split(spec), spec)


def get_teacher(args, data, split, spec):
    """(teacher, description): the --teacher file (only if it was trained on this data and split, as
    kdfast distill checks), else a BPR-MF teacher trained here for --teacher-epochs epochs."""
    teacher = experiment.get_teacher(
        data,
        split,
        spec,
        experiment.TeacherSpec(model="bprmf", dim=args.teacher_dim),
        experiment.TrainSpec(epochs=args.teacher_epochs, eval_every=args.teacher_epochs),
        path=args.teacher,
        log=None,
    )
    if teacher.loaded:
        return teacher, f"{os.path.basename(args.teacher)} (dim {teacher.user.shape[1]})"
    return teacher, f"BPR-MF dim {args.teacher_dim}, trained {args.teacher_epochs} epochs here"


def one_run(name, split, teacher, args, seed):
    """(seconds per epoch, method set-up seconds) of a fresh student trained --epochs epochs with
    the method NAME, or NAME@BACKEND: the method built with backend=BACKEND (e.g. rrd@torch)."""
    model = experiment.new_model(
        "bprmf", args.student_dim, split, torch.Generator().manual_seed(seed)
    )
    method, setup = None, 0.0
    if name != "none":
        base, _, backend = name.partition("@")
        t0 = time.perf_counter()
        method = experiment.build_method(
            base,
            teacher,
            split,
            args.student_dim,
            {"backend": backend} if backend else {},
            generator=torch.Generator().manual_seed(seed + 1),
        )
        setup = time.perf_counter() - t0
    train = experiment.TrainSpec(
        epochs=args.epochs, eval_every=args.epochs, patience=10**6, seed=seed
    )
    return experiment.fit(model, split, train, method=method, log=None)["seconds_per_epoch"], setup


def _shown_args(argv):
    """The command line, with the teacher file named by its base name (no machine paths in
    results)."""
    args = list(argv if argv is not None else sys.argv[1:])
    for i, a in enumerate(args):
        if i and args[i - 1] == "--teacher":
            args[i] = os.path.basename(a)
        elif a.startswith("--teacher="):
            args[i] = "--teacher=" + os.path.basename(a.split("=", 1)[1])
    return args


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic', 'citeulike-t' or a file (as kdfast distill)",
    )
    ap.add_argument("--protocol", default="loo", choices=("loo", "full"))
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument(
        "--teacher", default=None, help="a saved teacher file (kdfast distill's teacher.pt)"
    )
    ap.add_argument("--teacher-dim", type=int, default=200)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--student-dim", type=int, default=20)
    ap.add_argument(
        "--methods",
        default="none,rrd,ir-rrd",
        help="comma-separated; NAME@BACKEND builds the method with backend=BACKEND (rrd@torch)",
    )
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads-list", default="1,2")
    ap.add_argument(
        "--out", default=None, help="write the markdown table here (default: print only)"
    )
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" not in methods:
        methods.insert(0, "none")
    data, split, spec = load_split(args)
    teacher, about = get_teacher(args, data, split, spec)
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
            rows.append(
                {
                    "threads": n,
                    "method": m,
                    "s/epoch": sec,
                    "x no-KD": sec / base,
                    "set-up s": statistics.median(setups[m]) if m != "none" else float("nan"),
                    "runs (s/epoch)": ", ".join(f"{x:.3f}" for x in per[m]),
                }
            )
    header = (
        f"# CPU benchmark: seconds per training epoch, per KD method\n\n"
        f"Data: {data.name} ({split.n_users} users, {split.n_items} "
        f"items, {split.n_train} training interactions), protocol {args.protocol}; "
        f"student BPR-MF dim {args.student_dim}, batch 1024; teacher: {about}. Method defaults "
        f"(docs/METHODS.md); NAME@torch: the method on the reference backend (tensor samplers, "
        f"eager Plackett-Luce).\nCPU: {cpu_model()}; torch {torch.__version__}; kdfast backends: "
        f"{', '.join(k for k, v in kdfast.backends().items() if v[0])}; "
        f"date {time.strftime('%Y-%m-%d')}; "
        f"{args.rounds} rounds x {args.epochs} epochs per method, methods taking turns; "
        f"median of the "
        f"rounds' mean epoch time; {load_note()}.\n\n"
        f"Command: `python bench/cpu_epoch.py {' '.join(_shown_args(argv))}`\n\n"
    )
    table = markdown_table(
        rows, ["threads", "method", "s/epoch", "x no-KD", "set-up s", "runs (s/epoch)"]
    )
    write_result(args.out, header + table)


if __name__ == "__main__":
    main()
