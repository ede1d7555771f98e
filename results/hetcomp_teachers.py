"""Train HetComp's teachers and save their trajectories (four checkpoints each) for `kdfast distill
--methods hetcomp --option hetcomp.trajectories=FILE`.

Each teacher is trained on the split `kdfast distill` uses for the same
--data/--protocol/--split-seed, with the Trainer's defaults (BPR loss, Adam 1e-3, early stopping on
validation). Its embeddings are kept every --every epochs; after training, the checkpoints are the
first kept epochs whose validation --monitor reaches each of the fractions --levels of the best
value, and the best-validation state as the final one (an easy-to-hard trajectory by measured
quality, since the papers do not give their checkpoint epochs).

    python results/hetcomp_teachers.py --data citeulike-t --protocol full --teachers
        bprmf:200,lightgcn:64 \\ --epochs 250 --out teachers/citeulike-t_full_trajectories.pt

A teacher is MODEL:DIM[:lr=X][:wd=Y][:epochs=N] (Adam's learning rate and weight decay, and its
epoch cap, for that teacher only), MODEL any of kdfast.models.MODELS. The teacher families of
kdfast.families enter the trajectories as kdfast.families.dot_tables (tables whose dot products
are their scores); a teacher without tables (NeuMF) is trained and reported, and left out of the
trajectories (HetComp reads its teachers' checkpoints as tables).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

from kdfast import experiment
from kdfast.families import dot_tables
from kdfast.methods.hetcomp import save_trajectories, scorer_knowledge


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="citeulike-t")
    p.add_argument("--protocol", default="full", choices=("loo", "full"))
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--teachers", default="bprmf:200,lightgcn:64", help="comma-separated MODEL:DIM")
    p.add_argument("--epochs", type=int, default=250)
    p.add_argument(
        "--every",
        type=int,
        default=5,
        help="keep the embeddings every E epochs (also the validation period)",
    )
    p.add_argument("--patience", type=int, default=20)
    p.add_argument(
        "--levels",
        default="0.6,0.8,0.9",
        help="fractions of the best validation value for the early checkpoints",
    )
    p.add_argument("--monitor", default=None)
    p.add_argument(
        "--knowledge-k",
        type=int,
        default=100,
        help="a teacher without tables (NeuMF) is saved as its top-K lists per checkpoint: this K "
        "(HetComp's K must not exceed it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset, split = experiment.load_split(
        experiment.DataSpec(data=args.data, protocol=args.protocol, split_seed=args.split_seed)
    )
    train = experiment.TrainSpec(epochs=args.epochs, eval_every=args.every, patience=args.patience,
                                 monitor=args.monitor, seed=args.seed)  # fmt: skip
    monitor = train.monitor_for(args.protocol)
    levels = [float(x) for x in args.levels.split(",")]
    print(f"data: {dataset.describe()}\nsplit: {split.describe()}", flush=True)
    teachers = []
    reports = []
    for spec in args.teachers.split(","):
        kind, dim, *extra = spec.split(":")
        over = dict(x.split("=") for x in extra)
        spec_train = dataclasses.replace(
            train,
            lr=float(over.get("lr", train.lr)),
            weight_decay=float(over.get("wd", train.weight_decay)),
            epochs=int(over.get("epochs", train.epochs)),
        )
        kept = {}

        def keep(epoch, m, kept=kept):
            if epoch % args.every == 0:
                if getattr(m, "score", "dot") is not None:
                    kept[epoch] = tuple(t.clone() for t in dot_tables(m))
                else:  # a scorer: its state now, its lists later (only for the chosen epochs)
                    kept[epoch] = copy.deepcopy(m.state_dict())

        t0 = time.perf_counter()
        model, res = experiment.train_model(
            kind, int(dim), split, spec_train, name=f"{kind}{dim}", on_epoch_end=keep
        )
        report = {
            "name": f"{kind}{dim}",
            "model": kind,
            "dim": int(dim),
            "lr": spec_train.lr,
            "weight_decay": spec_train.weight_decay,
            "best_epoch": res["best_epoch"],
            "epochs_run": res["epochs_run"],
            "seconds": round(time.perf_counter() - t0),
            "valid": res["valid"],
            "test": res["test"],
        }
        reports.append(report)
        scorer = getattr(model, "score", "dot") is None
        best = res["valid"][monitor]
        valid = {h["epoch"]: h["valid"][monitor] for h in res["history"]}
        epochs = []
        for lv in levels:
            e = next(e for e in sorted(kept) if e in valid and valid[e] >= lv * best)
            epochs.append(max(e, epochs[-1] + args.every) if epochs else e)
        epochs.append(res["best_epoch"])
        epochs = sorted(set(min(e, res["best_epoch"]) for e in epochs))
        if scorer:  # no tables: each chosen checkpoint's lists (kdfast.topk_from_scorer)
            model.eval()
            ckpts = []
            for e in epochs:
                model.load_state_dict(kept[e])
                ckpts.append(
                    scorer_knowledge(
                        model.score_pairs, split.n_users, split.n_items, split.train,
                        args.knowledge_k,
                    )
                )  # fmt: skip
        else:
            ckpts = [kept[e] for e in epochs]
        print(
            f"{kind}{dim}: best epoch {res['best_epoch']}, valid {monitor} {best:.4f}, "
            f"test {res['test'][monitor]:.4f}; "
            f"checkpoints at epochs {epochs} (valid {[round(valid[e], 4) for e in epochs]}); "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        teachers.append(
            {
                "name": f"{kind}{dim}",
                "model": kind,
                "dim": int(dim),
                "epochs": epochs,
                "valid": [valid[e] for e in epochs],
                "test": res["test"],
                ("knowledge" if scorer else "checkpoints"): ckpts,
            }
        )
        del kept
    if not teachers:
        print("no teacher with tables: no trajectory file written", flush=True)
    else:
        _save(args, teachers, dataset, split, monitor)
    print(json.dumps(reports, indent=1))


def _save(args, teachers, dataset, split, monitor):
    save_trajectories(
        args.out,
        teachers,
        train=split.train,
        n_users=split.n_users,
        n_items=split.n_items,
        meta={
            "data_fingerprint": dataset.fingerprint(),
            "protocol": args.protocol,
            "split_seed": args.split_seed,
            "monitor": monitor,
        },
    )


if __name__ == "__main__":
    main()
