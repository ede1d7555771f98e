"""File formats are read from the content, not the name: the same ratings under any name keep
their rating threshold; users.dat content under another name is users.dat; pairs with a timestamp
stay pairs."""

import pytest

from kdfast import data as kd
from kdfast.cli import main
from kdfast.data.datasets import sniff_format

# user, item, rating, timestamp: user 1 rates 6 items >= 4 and 2 below; user 2 rates 5 items >= 4
RATINGS = [(1, i, 5 if i < 6 else 2, 1000 + i) for i in range(8)] + [
    (2, i, 4, 2000 + i) for i in range(10, 15)
]


def _write(path, rows, sep, header=None):
    text = [sep.join(header)] if header else []
    text += [sep.join(str(x) for x in r) for r in rows]
    path.write_text("\n".join(text) + "\n")
    return path


@pytest.mark.parametrize(
    "name, sep, header",
    [
        ("myratings.csv", ",", ("userId", "movieId", "rating", "timestamp")),
        ("ratings.txt", "\t", None),
        ("stuff.dat", "::", None),
        ("u.data", "\t", None),
        ("noext", " ", None),
    ],
)
def test_ratings_under_any_name_keep_the_threshold(tmp_path, name, sep, header):
    path = _write(tmp_path / name, RATINGS, sep, header)
    found = sniff_format(path)
    assert found["format"] == "movielens" and found["header"] == bool(header)
    d = kd.load(str(path), threshold=4.0, min_user_interactions=1)
    assert d.nnz == 6 + 5  # the two ratings of 2 are not interactions
    assert kd.load(str(path), threshold=1.0, min_user_interactions=1).nnz == 8 + 5


def test_users_dat_content_under_another_name(tmp_path):
    path = tmp_path / "lists.txt"
    path.write_text("3 1 2 3\n2 0 4\n1 5\n")
    assert sniff_format(path)["format"] == "users-dat"
    assert kd.load(str(path), min_user_interactions=1).nnz == 6


@pytest.mark.parametrize(
    "text",
    [
        "1,10,1700000000\n1,11,1700000001\n2,10,1700000002\n",  # a timestamp, not a rating
        "user,item\nalice,book\nbob,film\n",
        "1 10\n2 20\n3 30\n",
    ],
)
def test_pairs_stay_pairs(tmp_path, text):
    path = tmp_path / "ratings.csv"  # a rating-like name does not make it ratings
    path.write_text(text)
    assert sniff_format(path)["format"] == "pairs"
    # (a first line of names among name ids is data: load_pairs drops a header only above ints)
    assert kd.load(str(path), min_user_interactions=1).nnz == 3


def test_cli_min_rating_and_the_detected_format_is_logged(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    rows = [(u, i, 5 if (u + i) % 3 else 1, 0) for u in range(40) for i in range(30) if (u + i) % 2]
    path = _write(tmp_path / "my.csv", rows, ",", ("user", "item", "rating", "ts"))
    args = ["distill", "--data", str(path), "--n-neg", "5", "--teacher-dim", "4",
            "--student-dim", "2", "--epochs", "1", "--methods", "none", "--no-progress",
            "--threads", "1"]  # fmt: skip
    assert main([*args, "--min-rating", "3", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "format: movielens (detected from the content: header column 'rating')" in out
    n_a = int(out.split("'interactions': ")[1].split(",")[0])
    assert main([*args, "--min-rating", "0.5", "--out", str(tmp_path / "b")]) == 0
    n_b = int(capsys.readouterr().out.split("'interactions': ")[1].split(",")[0])
    assert n_a == sum(1 for r in rows if r[2] >= 3) and n_b == len(rows)
