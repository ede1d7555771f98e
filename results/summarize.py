"""Markdown tables of kdfast distill runs: `python results/summarize.py results/citeulike-t/*.json`.

Each file is a results.json written by `kdfast distill` (several files of one protocol are merged; a method
that appears twice with the same options keeps the last; other options, or a weight decay other than 1e-3,
make another row). Prints, per protocol and student dimension, the teacher, every student
and its change relative to the no-KD student of the same table.
"""
from __future__ import annotations

import json
import sys

METRICS = {"loo": ["NDCG@10", "HR@10", "MRR@10", "NDCG@20"], "full": ["Recall@20", "NDCG@20", "Recall@50", "NDCG@50"]}
KEY = {"loo": "NDCG@10", "full": "Recall@50"}


def main(paths):
    tables = {}
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        cfg = run["config"]
        key = (cfg["protocol"], cfg["student_dim"])
        t = tables.setdefault(key, {"teacher": run["teacher"], "students": {}, "epochs": cfg["epochs"]})
        for name, res in run["students"].items():
            opts = cfg.get("method_options", {}).get(name) or {}
            extra = {k: v for k, v in (("weight_decay", cfg.get("weight_decay")),) if v not in (None, 1e-3)}
            opts = dict(opts, **extra)
            # a method run with other options is another row
            key = (name, json.dumps(opts, sort_keys=True))
            t["students"][key] = dict(res, options=opts, epochs_cap=cfg["epochs"])
    for (protocol, dim), t in sorted(tables.items()):
        cols = METRICS[protocol]
        print(f"\n### {protocol}, student dim {dim}\n")
        print("| model | " + " | ".join(cols) + f" | {KEY[protocol]} vs none | best epoch / cap | s/epoch | options |")
        print("|---" * (len(cols) + 5) + "|")
        print("| teacher (dim 200) | " + " | ".join(f"{t['teacher']['test'][c]:.4f}" for c in cols) + " | | | | |")
        base = t["students"].get(("none", "{}"), {}).get("test", {}).get(KEY[protocol])
        for (name, _), r in sorted(t["students"].items(), key=lambda kv: (kv[0] != ("none", "{}"))):
            rel = "" if base is None or name == "none" else f"{100 * (r['test'][KEY[protocol]] / base - 1):+.1f}%"
            opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
            print(f"| {name} | " + " | ".join(f"{r['test'][c]:.4f}" for c in cols)
                  + f" | {rel} | {r['best_epoch']} / {r['epochs_cap']} | {r['seconds_per_epoch']:.2f} | {opts} |")


if __name__ == "__main__":
    main(sys.argv[1:])
