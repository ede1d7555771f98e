"""kdfast distill's data options: --split-order temporal, --k-core, --export-split, and a saved
teacher never reused across split orders."""

import gzip
import json
import random

import pytest

from kdfast.cli import main

BASE = ["--teacher-dim", "8", "--student-dim", "4", "--epochs", "2", "--methods", "none"]
BASE += ["--n-neg", "20", "--no-progress", "--threads", "1", "--min-interactions", "3"]


@pytest.fixture
def ratings(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    rng = random.Random(0)
    lines = ["user,item,rating,timestamp"]
    for u in range(60):
        for j in range(12):
            lines.append(f"{u},{rng.randrange(80)},{rng.choice([3, 4, 5])},{1000 + 10 * u + j}")
    path = tmp_path / "ratings.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_temporal_split_kcore_and_export(tmp_path, ratings):
    out, csv_gz = tmp_path / "o", tmp_path / "split.csv.gz"
    args = ["distill", "--data", str(ratings), *BASE, "--split-order", "temporal"]
    rc = main([*args, "--k-core", "2", "--export-split", str(csv_gz), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["split"]["order"] == "temporal"
    assert res["config"]["args"]["k_core"] == 2
    rows = gzip.open(csv_gz, "rt").read().splitlines()
    assert rows[0] == "user_id,item_id,part"
    parts = [r.split(",")[2] for r in rows[1:]]
    assert parts.count("test") == parts.count("valid") == res["config"]["split"]["test"]
    # the held-out test item of each user is its latest interaction among the kept ones
    kept = {(r.split(",")[0], r.split(",")[1]) for r in rows[1:] if "negative" not in r}
    latest = {}
    for line in ratings.read_text().splitlines()[1:]:
        u, i, rating, t = line.split(",")
        if float(rating) >= 4 and (u, i) in kept:
            latest[u] = max(latest.get(u, (0, "")), (int(t), i))
    tests = {r.split(",")[0]: r.split(",")[1] for r in rows[1:] if r.endswith(",test")}
    assert tests == {u: i for u, (t, i) in latest.items()}
    # the same teacher file with a random split: refused, not reused
    rc = main(["distill", "--data", str(ratings), *BASE, "--teacher", str(out / "teacher.pt"),
               "--k-core", "2", "--out", str(tmp_path / "o2")])  # fmt: skip
    assert rc == 2


def test_bad_values_name_the_flag(tmp_path, ratings, capsys):
    rc = main(["distill", "--data", str(ratings), *BASE, "--k-core", "0", "--out", str(tmp_path)])
    assert rc == 2 and "--k-core must be >= 1" in capsys.readouterr().err
    rc = main(["distill", *BASE, "--split-order", "temporal", "--out", str(tmp_path / "s")])
    assert rc == 2 and "needs timestamps" in capsys.readouterr().err
