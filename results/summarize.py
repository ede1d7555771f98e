"""Markdown tables of kdfast distill runs: `python results/summarize.py results/citeulike-t/*.json`.

Each file is a results.json written by `kdfast distill` (several files of one protocol are merged; a
method that appears twice with the same options keeps the last; other options, or a weight decay
other than 1e-3, make another row). Prints, per protocol and student dimension, the teacher, every
student and its change relative to the no-KD student of the same table.
"""

from __future__ import annotations

import json
import sys

from kdfast.experiment import format_table, summary_columns, summary_rows

KEY = {"loo": "NDCG@10", "full": "Recall@50"}


def main(paths):
    tables = {}
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        cfg = run["config"]
        key = (cfg["protocol"], cfg["student_dim"])
        t = tables.setdefault(
            key, {"teacher": run["teacher"], "students": {}, "epochs": cfg["epochs"]}
        )
        for name, res in run["students"].items():
            opts = cfg.get("method_options", {}).get(name) or {}
            extra = {
                k: v
                for k, v in (("weight_decay", cfg.get("weight_decay")),)
                if v not in (None, 1e-3)
            }
            opts = dict(opts, **extra)
            # a method run with other options is another row
            label = name if not opts else f"{name} {json.dumps(opts, sort_keys=True)}"
            t["students"][label] = dict(res, name=name, options=opts, epochs_cap=cfg["epochs"])
    for (protocol, dim), t in sorted(tables.items()):
        monitor = KEY[protocol]
        cols = summary_columns(protocol, monitor)
        students = dict(sorted(t["students"].items(), key=lambda kv: kv[0] != "none"))
        rows = summary_rows(
            t["teacher"]["test"], students, cols, monitor, teacher_label="teacher (dim 200)"
        )
        for row, r in zip(rows[1:], students.values()):
            row[0] = r["name"]
            row += [f"{r['best_epoch']} / {r['epochs_cap']}", f"{r['seconds_per_epoch']:.2f}",
                    ", ".join(f"{k}={v}" for k, v in r["options"].items())]  # fmt: skip
        header = ["model"] + cols + [f"{monitor} vs none", "best epoch / cap", "s/epoch", "options"]
        print(f"\n### {protocol}, student dim {dim}\n")
        print(format_table(rows, header, markdown=True))


if __name__ == "__main__":
    main(sys.argv[1:])
