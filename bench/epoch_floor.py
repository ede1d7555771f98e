"""Every registered KD method's training epoch against its floor, on the CPU.

    python bench/epoch_floor.py [--data citeulike-t] [--threads 1] [--max-steps 30] \
        [--out bench/results/<device>/epoch_floor.md]

Per method (kdfast.methods.registry, plus "de@selected" / "htd@selected": DE and HTD evaluating only
each row's selected expert, select_only_below=2), on CiteULike-t (KDFAST_DATA, else the synthetic
set of its shape), BPR-MF teacher dim 200 -> student dim 20, batch 1024:

- measured: one epoch the trainer's way (bench/ops/epoch.py: start_epoch, then per step the BPR sum
  loss + the KD loss, backward, fused Adam): start_epoch's seconds + the median step time (of the
  first --max-steps steps after one warm-up step) times the epoch's steps;
- floor: the work the method's math must do in that epoch (`work` below, counted on the epoch's
  actual batches), as max(FLOPs / sgemm rate, bytes / copy bandwidth) + exponentials / exp rate
  + the no-KD epoch measured in the same run, with the rates measured in the same run just before
  each method (`rates`): a square float32 torch.mm, a 64 MiB copy and torch.exp over 16 Mi
  float32 values;
- ratio: measured / floor.

The floor counts (d_t = 200, d_s = 20; FLOPs = 2 x multiply-adds; "x3" = forward, then the
backward's two products of the same size; per step over the batch's unique users U_b, unique
positive items P_b, unique negative items N_b, unique items I_b = P_b u N_b; 4-byte floats):

- de: rows R = |U_b| + |P_b| + |N_b|; selection net R d_t M (x2: no input gradient); experts
  R M' (d_s h + h d_t) x3 with h = (d_s + d_t) // 2 and M' = M (the exact mixture, the default) or 1
  (selected only); bytes: the rows' teacher and student embeddings, the student gradient, every
  expert weight read twice and its gradient written.
- phr: R rows through PNet d_t -> H = d_t + d_s d_t -> d_s d_t (x3) and the per-row map d_t d_s
  (x3); bytes: PNet's weights read twice, gradient written, plus the rows' embeddings.
- ftd: N = |U_b| + |I_b| rows; the Gram rewrite: N (d_t^2 + d_t d_s + d_s^2) forward, N (d_t d_s +
  d_s^2) x2 backward (student only); bytes: the rows in, the student gradient out.
- htd: N rows; assignment N d_t K x2; GA term as DE with K experts over N rows; entity level
  sum_g n_g^2 (d_t + d_s) (teacher cosine filter: every in-group pair's teacher and student cosine)
  + sum_g n_g^2 d_s backward; group level N P (d_t + d_s) + N P d_s backward (P present groups);
  n_g from the method's own assignment of the batch's entities.
- rrd: |U_b| (K + L) dots of d_s, x3 (scores, then the gradients of the user and item rows); bytes:
  the gathered item rows read and their gradients written, the ids; per epoch the samples written.
- rrd-full: |U_b| x I scores (x3: the score GEMM, both gradients); bytes: the item table read three
  times.
- ir-rrd: rrd + the item side: the unique items among the batch users' samples, (K_I + L_I) dots
  each, x3; per epoch both sides' samples written.
- rd: |U_b| K dots x3; per epoch U n_sample scores and U K n_sample comparisons.
- cd: |U_b| K dots x3; per epoch U K teacher scores (d_t).
- dcd: |U_b| 2K dots and |P_b| 2K_I dots, x3; per epoch the student's full U x I score matrix
  (its rank counting), once per side (rank="catalog").
- unkd: |U_b| S pairs, two dots each, x3.
- hetcomp (one teacher, one checkpoint: the teacher's tables): per step the catalog tail of each
  batch user's scores, |U_b| x I (x3), as rrd-full (the lists' own scores are negligible).

Exponentials (the "G exp" column): rrd-full and hetcomp must exponentiate every score of the
catalog tail, |U_b| x I per step, at least once (the forward's sum; the floor lets the backward
reuse them for free, so it stays a lower bound). They cannot overlap the products on the same
vector units, so their time is added. The other methods' exponentials (a listwise loss over K + L
sampled items, DCD's tanh and Gumbel noise over the N listed ids) are at most a few million per
epoch and are not counted.

Timings taken while other jobs share the machine are labelled with the load average (the header).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import harness  # noqa: E402
from bench.ops import epoch as ep  # noqa: E402

F = 4  # bytes per float32


def rates(reps=7):
    """(sgemm FLOP/s of a 1024^3 float32 torch.mm, copy bytes/s of a 64 MiB float32 copy: read +
    write, exponentials/s of torch.exp over 16 Mi float32 values in [-20, 0]), medians over reps."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x = torch.empty(1 << 24)
    y = torch.empty_like(x)
    e = torch.rand(1 << 24) * -20.0

    def med(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return (
        2 * 1024**3 / med(lambda: torch.mm(a, b)),
        2 * x.numel() * F / med(lambda: y.copy_(x)),
        e.numel() / med(lambda: torch.exp(e, out=y)),
    )


def _hidden(d_s, d_t):
    return d_t // 2 if d_s == d_t else (d_s + d_t) // 2


def work(name, method, split, epoch):
    """(FLOPs, bytes, exponentials) the method's math must do in the epoch `epoch` (see the module
    docstring)."""
    base = name.split("@")[0]
    base = "rrd" if base == "rrd-full" else base  # RRD with sampling=False
    if method is None:
        return 0.0, 0.0, 0.0
    d_t, d_s = ep.TEACHER_DIM, ep.STUDENT_DIM
    U, I = split.n_users, split.n_items
    flops = byts = exps = 0.0
    if base == "ir-rrd":  # the per-epoch samples of both sides
        byts += (U * (method.user_side.k + method.user_side.n_unint) * 8) + (
            I * (method.item_side.k + method.item_side.n_unint) * 8
        )
    elif base == "rrd" and method.sampling:
        byts += U * (method.user_side.k + method.user_side.n_unint) * 8
    elif base == "rd":
        flops += 2 * U * method.n_sample * d_s + U * method.K * method.n_sample
    elif base == "cd":
        flops += 2 * U * method.K * d_t
    elif base == "dcd":  # the student's rank of every teacher-listed id: a full score matrix
        flops += 2 * U * I * d_s * (2 if method.item_side is not None else 1)
    for b in range(epoch.n_steps):
        users, pos, neg = epoch.step(b)
        ub, pb, nb = users.unique(), pos.unique(), neg.unique()
        ib = torch.cat([pos, neg]).unique()
        nu, npo, nne, ni = len(ub), len(pb), len(nb), len(ib)
        if base == "de":
            m = method.experts["user"].w1.shape[0]
            h = _hidden(d_s, d_t)
            used = 1 if method.select_only_below is not None else m
            r = nu + npo + nne
            flops += 2 * (2 * r * d_t * m + 3 * r * used * (d_s * h + h * d_t))
            byts += F * (r * (d_t + 2 * d_s) + 2 * 3 * m * (d_s * h + h * d_t))
        elif base == "phr":
            r = nu + npo + nne
            hh = d_t + d_s * d_t
            wts = d_t * hh + hh * d_s * d_t
            flops += 2 * 3 * r * (wts + d_t * d_s)
            byts += F * (3 * wts + r * (d_t + 2 * d_s))
        elif base == "ftd":
            n = nu + ni
            flops += 2 * (n * (d_t * d_t + d_t * d_s + d_s * d_s) + 2 * n * (d_t * d_s + d_s * d_s))
            byts += F * n * (d_t + 2 * d_s)
        elif base == "htd":
            n = nu + ni
            k = method.n_groups
            h = _hidden(d_s, d_t)
            used = 1 if method.select_only_below is not None else k
            with torch.no_grad():
                gu = method.assign["user"](method.teacher_user[ub]).argmax(1)
                gi = method.assign["item"](method.teacher_item[ib]).argmax(1) + k
            counts = torch.bincount(torch.cat([gu, gi]), minlength=2 * k).double()
            pairs = float((counts**2).sum())
            present = int((counts > 0).sum())
            flops += 2 * (2 * n * d_t * k + 3 * n * used * (d_s * h + h * d_t))
            flops += 2 * (pairs * (d_t + 2 * d_s) + n * present * (d_t + 2 * d_s))
            byts += F * (n * (d_t + 2 * d_s) + 2 * 3 * k * (d_s * h + h * d_t))
        elif base in ("rrd", "ir-rrd"):
            side = method.user_side
            if method.sampling:
                m = side.k + side.n_unint
                flops += 2 * 3 * nu * m * d_s
                byts += nu * m * (2 * F * d_s + 8)
            else:
                flops += 2 * 3 * nu * I * d_s
                byts += 3 * F * I * d_s
                exps += nu * I
            if base == "ir-rrd":
                ids = torch.cat([side.interesting[ub].flatten(), side.uninteresting[ub].flatten()])
                if method.item_source == "pos" or not method.sampling:
                    ids = pos
                items = len(ids.unique())
                m = method.item_side.k + method.item_side.n_unint
                flops += 2 * 3 * items * m * d_s
                byts += items * m * (2 * F * d_s + 8)
        elif base == "hetcomp":  # both phases: the catalog tail of every batch user's scores
            nu = min(nu, method.max_users) if getattr(method, "max_users", None) else nu
            flops += 2 * 3 * nu * I * d_s
            byts += 3 * F * I * d_s
            exps += nu * I
        elif base in ("rd", "cd"):
            flops += 2 * 3 * nu * method.K * d_s
            byts += nu * method.K * (2 * F * d_s + 8)
        elif base == "dcd":
            k = method.user_side.k
            k_i = method.item_side.k if method.item_side is not None else 0
            flops += 2 * 3 * d_s * (nu * 2 * k + npo * 2 * k_i)
            byts += (nu * 2 * k + npo * 2 * k_i) * (2 * F * d_s + 8)
        elif base == "unkd":
            n_pairs = method.pair_group.numel()
            flops += 2 * 3 * nu * n_pairs * 2 * d_s
            byts += nu * n_pairs * 2 * (2 * F * d_s + 8)
    return flops, byts, exps


VARIANTS = {"de@selected": ("de", {"select_only_below": 2.0})}
VARIANTS["htd@selected"] = ("htd", {"select_only_below": 2.0})


def build_variant(name, split, tu, ti):
    """ep.build for a registered name or one of VARIANTS."""
    if name not in VARIANTS:
        return ep.build(name, split, tu, ti)
    base, extra = VARIANTS[name]
    cls, options = ep.method_class(base)
    model, _, _ = ep.build("none", split, tu, ti)
    t0 = time.perf_counter()
    method = cls.build(
        tu,
        ti,
        split.train,
        ep.STUDENT_DIM,
        generator=torch.Generator().manual_seed(2),
        **options,
        **extra,
    )
    return model, method, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="citeulike-t", help="citeulike-t (KDFAST_DATA) or synthetic")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all, + variants)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=30, help="timed steps per method (0: all)")
    ap.add_argument("--out", default=None, help="markdown path; the .json goes beside it")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = args.data
    if data != "synthetic":
        try:
            _, split = ep.load(data)
        except (OSError, ValueError) as exc:
            print(f"{data} unavailable ({exc}); synthetic data of its shape instead")
            data = "synthetic"
    if data == "synthetic":
        _, split = ep.load("synthetic")
    tu, ti = ep.random_teacher(split)
    epoch = ep.Epoch(split)
    names = args.methods.split(",") if args.methods else ep.method_names() + list(VARIANTS)
    steps = args.max_steps or None
    rows = []
    model, _, _ = ep.build("none", split, tu, ti)
    base = ep.run_epoch(model, None, epoch, steps=None)["epoch_s"]  # a whole no-KD epoch
    rows.append({"method": "none", "measured s": base, "floor s": base, "x floor": 1.0})
    for name in names:
        row = {"method": name}
        try:
            model, method, setup = build_variant(name, split, tu, ti)
        except Exception as exc:  # noqa: BLE001 - a method that cannot run is a row
            row["note"] = f"not built: {' '.join(str(exc).split())[:160]}"
            rows.append(row)
            continue
        flop_rate, bandwidth, exp_rate = rates()  # just before the method: load varies
        r = ep.run_epoch(model, method, epoch, steps=steps)
        flops, byts, exps = work(name, method, split, epoch)
        kd_floor = max(flops / flop_rate, byts / bandwidth) + exps / exp_rate
        floor = kd_floor + base
        row.update(
            {
                "GFLOP": flops / 1e9,
                "GB": byts / 1e9,
                "G exp": exps / 1e9 if exps else None,
                "KD floor s": kd_floor,
                "floor s": floor,
                "measured s": r["epoch_s"],
                "x floor": r["epoch_s"] / floor,
                "x no-KD": r["epoch_s"] / base,
                "step ms": r["step_s"] * 1e3,
                "start_epoch s": r["start_s"],
                "build s": setup,
                "sgemm GFLOP/s": flop_rate / 1e9,
                "copy GB/s": bandwidth / 1e9,
                "exp G/s": exp_rate / 1e9,
                "note": f"{r['steps']} of {epoch.n_steps} steps timed",
            }
        )
        rows.append(row)
        print(harness.markdown_table([row], list(row)), flush=True)
    env = harness.environment("cpu", args.threads)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    intro = [
        f"- data: {data} ({split.n_users} users, {split.n_items} items, {split.n_train} training "
        f"interactions), leave-one-out split; random teacher tables N(0, 0.1^2) dim 200, student "
        f"BPR-MF dim 20, batch 1024, {epoch.n_steps} steps per epoch",
        "- rates measured in this run just before each method (columns sgemm GFLOP/s: a 1024^3 "
        "float32 torch.mm; copy GB/s: a 64 MiB float32 copy, read + write; exp G/s: torch.exp "
        "over 16 Mi float32 values)",
        "- floor s = max(GFLOP / sgemm rate, GB / copy rate) + G exp / exp rate + the no-KD "
        "epoch; x floor = measured / floor; the counts per method are in bench/epoch_floor.py's "
        "docstring (exponentials: the catalog tail of rrd-full and hetcomp, once per score)",
    ]
    out = args.out
    cols = [
        "method",
        "GFLOP",
        "GB",
        "G exp",
        "KD floor s",
        "floor s",
        "measured s",
        "x floor",
        "x no-KD",
        "step ms",
        "start_epoch s",
        "build s",
        "sgemm GFLOP/s",
        "copy GB/s",
        "exp G/s",
        "note",
    ]
    if out:
        text = harness.write_results(
            out,
            "CPU: every KD method's epoch against its floor",
            env,
            rows,
            cols,
            intro=intro,
            command=f"python bench/epoch_floor.py {shown}",
        )
    else:
        text = harness.markdown_table(rows, cols)
    print(text)


if __name__ == "__main__":
    main()
