"""kdfast.data for the researcher's workflow: timestamps read from each file format, the iterated
k-core, temporal splits (leave-last-out, time-ordered 60/20/20) with known answers, and a split
exported as original ids and read back."""

import csv
import gzip
import warnings

import numpy as np
import pytest
import torch

from kdfast import data as kd
from kdfast.data.datasets import sniff_format


def rows_of(csr):
    indptr, indices = csr
    return [indices[indptr[u] : indptr[u + 1]].tolist() for u in range(indptr.numel() - 1)]


def times_of(d):
    """{(original user, original item): timestamp} of an Interactions with timestamps."""
    t = d.timestamps.tolist()
    out, k = {}, 0
    for u, row in enumerate(rows_of(d.csr)):
        for i in row:
            out[(d.user_ids[u].item(), d.item_ids[i].item())] = t[k]
            k += 1
    return out


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# user, item, rating, time: the ratings >= 4 are the interactions
RATINGS = [(1, 10, 5, 1000), (1, 11, 3, 1005), (1, 12, 4, 1002), (2, 10, 4, 1010), (2, 13, 5, 999)]
KEPT = {(1, 10): 1000, (1, 12): 1002, (2, 10): 1010, (2, 13): 999}


# ---------------------------------------------------------------- timestamps per format
@pytest.mark.parametrize(
    "name, sep, header",
    [
        ("u.data", "\t", None),
        ("ratings.dat", "::", None),
        ("ratings.csv", ",", "userId,movieId,rating,timestamp"),
        ("ml.inter", "\t", "user_id:token\titem_id:token\trating:float\ttimestamp:float"),
    ],
)
def test_ratings_timestamps(tmp_path, name, sep, header):
    lines = [sep.join(str(x) for x in r) for r in RATINGS]
    p = write(tmp_path, name, "\n".join(([header] if header else []) + lines) + "\n")
    assert sniff_format(p)["format"] == "movielens"
    d = kd.load(str(p), min_user_interactions=1)
    assert d.timestamps.dtype == torch.int64 and d.timestamps.shape == d.indices.shape
    assert times_of(d) == KEPT


def test_recbole_float_timestamps_and_pairs_inter(tmp_path):
    p = write(
        tmp_path,
        "ml.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t5.0\t1000.5\n1\t12\t4.0\t1002.0\n2\t10\t4.0\t1010.0\n",
    )
    d = kd.load(str(p), min_user_interactions=1)
    assert d.timestamps.dtype == torch.float64
    assert times_of(d) == {(1, 10): 1000.5, (1, 12): 1002.0, (2, 10): 1010.0}
    # a RecBole .inter without ratings is read as pairs; its header names the time column
    q = write(
        tmp_path,
        "pairs.inter",
        "user_id:token\titem_id:token\ttimestamp:float\n1\t10\t1700000000\n2\t11\t1700000005\n",
    )
    assert sniff_format(q)["format"] == "pairs"
    e = kd.load(str(q), min_user_interactions=1)
    assert times_of(e) == {(1, 10): 1700000000, (2, 11): 1700000005}


def test_pairs_timestamps_only_with_a_header(tmp_path):
    # small times under a header naming them: pairs with times, not ratings in [0, 10]
    p = write(tmp_path, "log.csv", "user,item,timestamp\n1,10,3\n1,11,1\n2,10,2\n")
    assert sniff_format(p)["format"] == "pairs"
    d = kd.load(str(p), min_user_interactions=1)
    assert d.nnz == 3 and times_of(d) == {(1, 10): 3, (1, 11): 1, (2, 10): 2}
    q = write(tmp_path, "log2.tsv", "user\titem\tclicks\tts\n1\t10\t17\t50\n2\t10\t12\t60\n")
    assert times_of(kd.load(str(q), min_user_interactions=1)) == {(1, 10): 50, (2, 10): 60}
    # without a header a third column could be anything: no timestamps
    r = write(tmp_path, "plain.csv", "1,10,1700000000\n1,11,1700000001\n2,10,1700000002\n")
    assert kd.load(str(r), min_user_interactions=1).timestamps is None
    # a header without a time column: none either
    s = write(tmp_path, "plain2.csv", "user,item\n1,10\n2,10\n")
    assert kd.load(str(s), min_user_interactions=1).timestamps is None


def test_sources_without_timestamps(tmp_path):
    assert kd.synthetic(50, 60, seed=0).timestamps is None
    u = write(tmp_path, "users.dat", "2 1 2\n1 3\n")
    assert kd.load(str(u), min_user_interactions=1).timestamps is None
    # a headerless rating file where a line lacks the 4th field: no timestamps, no warning
    p = write(tmp_path, "u.data", "1\t10\t5\t100\n1\t11\t5\n2\t10\t5\t300\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kd.load(str(p), min_user_interactions=1).timestamps is None


def test_repeated_pair_keeps_its_latest_time(tmp_path):
    p = write(tmp_path, "log.csv", "user,item,timestamp\n1,10,5\n1,10,9\n1,10,7\n1,11,4\n")
    d = kd.load(str(p), min_user_interactions=1)
    assert d.nnz == 2 and times_of(d) == {(1, 10): 9, (1, 11): 4}
    # ratings: only the lines rated >= threshold count (the later 2-star line does not)
    q = write(tmp_path, "u.data", "1\t10\t5\t100\n1\t10\t2\t500\n1\t10\t4\t200\n1\t11\t4\t50\n")
    assert times_of(kd.load(str(q), min_user_interactions=1)) == {(1, 10): 200, (1, 11): 50}
    e = kd.from_pairs(["a", "a", "b"], ["x", "x", "x"], name="m", timestamps=[3.5, 1.0, 2.0])
    assert e.timestamps.dtype == torch.float64 and times_of(e) == {("a", "x"): 3.5, ("b", "x"): 2.0}


def test_malformed_declared_timestamp_warns_and_loads_without(tmp_path):
    p = write(tmp_path, "r.csv", "userId,movieId,rating,timestamp\n1,10,5,100\n1,11,5,soon\n")
    with pytest.warns(UserWarning, match=r"r.csv, line 3: timestamp 'soon' is not a finite"):
        d = kd.load(str(p), min_user_interactions=1)
    assert d.timestamps is None and d.nnz == 2
    q = write(tmp_path, "p.csv", "user,item,timestamp\n1,10,100\n1,11,nan\n")
    with pytest.warns(UserWarning, match=r"p.csv, line 3: timestamp 'nan'"):
        assert kd.load(str(q), min_user_interactions=1).timestamps is None
    with pytest.raises(ValueError, match="finite"):
        kd.from_pairs([1], [2], name="x", timestamps=[float("inf")])
    with pytest.raises(ValueError, match="parallel"):
        kd.from_pairs([1, 2], [2, 3], name="x", timestamps=[1])


def test_fingerprint_leaves_timestamps_out_unless_asked(tmp_path):
    p = write(tmp_path, "u.data", "".join(f"{u}\t{i}\t5\t{u * 10 + i}\n" for u, i, *_ in RATINGS))
    d = kd.load(str(p), min_user_interactions=1)
    plain = kd.from_pairs(d.user_ids[np.repeat(np.arange(d.n_users), np.diff(d.indptr.numpy()))],
                          d.item_ids[d.indices.numpy()], name="same")  # fmt: skip
    assert plain.timestamps is None and d.fingerprint() == plain.fingerprint()
    assert plain.fingerprint(timestamps=True) == plain.fingerprint()
    assert d.fingerprint(timestamps=True) != d.fingerprint()
    q = write(tmp_path, "v.data", "".join(f"{u}\t{i}\t5\t{u * 10 - i}\n" for u, i, *_ in RATINGS))
    e = kd.load(str(q), min_user_interactions=1)
    assert e.fingerprint() == d.fingerprint()
    assert e.fingerprint(timestamps=True) != d.fingerprint(timestamps=True)
    assert "timestamps" in d.describe() and "timestamps" not in plain.describe()


# ---------------------------------------------------------------- k-core
def test_k_core_iterates_where_one_pass_does_not():
    # users 1 and 2 share items a, b; user 3 has a and c; user 4 has c and d.
    # One pass (users with >= 2 items) keeps everyone. The 2-core: d has 1 user -> out, so user 4
    # has 1 item -> out, so c has 1 user -> out, so user 3 has 1 item -> out: {1, 2} x {a, b}.
    users = [1, 1, 2, 2, 3, 3, 4, 4]
    items = ["a", "b", "a", "b", "a", "c", "c", "d"]
    once = kd.from_pairs(users, items, name="t", min_user_interactions=2)
    assert once.user_ids.tolist() == [1, 2, 3, 4] and once.nnz == 8
    core = kd.from_pairs(users, items, name="t", min_user_interactions=2, k_core=2)
    assert core.user_ids.tolist() == [1, 2] and core.item_ids.tolist() == ["a", "b"]
    assert rows_of(core.csr) == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="k_core=3"):
        kd.from_pairs(users, items, name="t", k_core=3)
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="k_core must be None or an integer >= 1"):
            kd.from_pairs(users, items, name="t", k_core=bad)


def reference_core(pairs, k):
    """The k-core by removing one offending user or item at a time."""
    pairs = set(pairs)
    while True:
        ucount, icount = {}, {}
        for u, i in pairs:
            ucount[u] = ucount.get(u, 0) + 1
            icount[i] = icount.get(i, 0) + 1
        bad = next(((u, i) for u, i in sorted(pairs) if ucount[u] < k or icount[i] < k), None)
        if bad is None:
            return pairs
        u, i = bad
        pairs = {p for p in pairs if (p[0] != u if ucount[u] < k else p[1] != i)}


@pytest.mark.parametrize("seed", range(6))
def test_k_core_matches_a_reference_and_keeps_timestamps(seed):
    rng = np.random.default_rng(seed)
    n = 300
    users, items = rng.integers(0, 40, n), rng.integers(0, 30, n) ** 2 // 30
    times = rng.integers(0, 1000, n)
    for k in (2, 3, 4):
        want = reference_core(zip(users.tolist(), items.tolist()), k)
        if not want:
            with pytest.raises(ValueError, match="no interactions left"):
                kd.from_pairs(users, items, name="r", k_core=k)
            continue
        d = kd.from_pairs(users, items, name="r", k_core=k, timestamps=times)
        got = set(times_of(d))
        assert got == want
        latest = {}
        for u, i, t in zip(users.tolist(), items.tolist(), times.tolist()):
            latest[(u, i)] = max(latest.get((u, i), t), t)
        assert times_of(d) == {p: latest[p] for p in want}


def test_k_core_through_load(tmp_path):
    p = write(tmp_path, "pairs.csv", "1,a\n1,b\n2,a\n2,b\n3,a\n3,c\n4,c\n4,d\n")
    assert kd.load(str(p), min_user_interactions=2).n_users == 4
    d = kd.load(str(p), min_user_interactions=2, k_core=2)
    assert d.user_ids.tolist() == ["1", "2"] and d.item_ids.tolist() == ["a", "b"]  # strings
    s = kd.load("synthetic", n_users=300, n_items=200, k_core=8)
    assert np.diff(s.indptr.numpy()).min() >= 8
    assert np.bincount(s.indices.numpy(), minlength=s.n_items).min() >= 8
    with pytest.raises(ValueError, match="k_core"):
        kd.load("synthetic", k_core=0)


# ---------------------------------------------------------------- temporal splits
def timed(rows):
    """Interactions from (user, item, time) triples."""
    u, i, t = zip(*rows)
    return kd.from_pairs(list(u), list(i), name="hand", timestamps=list(t))


# user 0: items 10..13 at times 4, 1, 3, 2        -> test 10, valid 12
# user 1: items 20, 21, 22 all at time 5 (a tie)   -> test 22, valid 21 (the larger id is later)
# user 2: items 30..33 at 7, 9, 9, 1 (tie at 9)    -> test 32, valid 31
# user 3: two items                               -> training only
HAND = [
    (0, 10, 4), (0, 11, 1), (0, 12, 3), (0, 13, 2),
    (1, 20, 5), (1, 21, 5), (1, 22, 5),
    (2, 30, 7), (2, 31, 9), (2, 32, 9), (2, 33, 1),
    (3, 40, 1), (3, 41, 2),
] + [(9, 100 + j, j) for j in range(40)]  # fmt: skip


def original(d, csr):
    return [[int(d.item_ids[i]) for i in row] for row in rows_of(csr)]


def test_leave_last_out_known_answer_and_ties():
    d = timed(HAND)
    s = kd.make_split(d, "loo", order="temporal", n_neg=5, seed=3)
    assert s.order == "temporal" and s.describe()["order"] == "temporal"
    assert s.data_fingerprint == d.fingerprint(timestamps=True)
    assert original(d, s.test)[:4] == [[10], [22], [32], []]
    assert original(d, s.valid)[:4] == [[12], [21], [31], []]
    assert original(d, s.train)[:4] == [[11, 13], [20], [30, 33], [40, 41]]
    assert original(d, s.test)[4] == [139] and original(d, s.valid)[4] == [138]
    assert s.eval_users.tolist() == [0, 1, 2, 4]
    rows = rows_of(d.csr)
    for r, u in enumerate(s.eval_users.tolist()):
        for cands, part in ((s.valid_candidates, s.valid), (s.test_candidates, s.test)):
            assert [int(cands[r, 0])] == rows_of(part)[u]
            negs = cands[r, 1:].tolist()
            assert len(set(negs)) == 5 and not set(negs) & set(rows[u])
    again = kd.leave_last_out(d, n_neg=5, seed=3)
    assert torch.equal(again.test_candidates, s.test_candidates)
    assert not torch.equal(kd.leave_last_out(d, n_neg=5, seed=4).test_candidates, s.test_candidates)


def test_temporal_full_known_answer():
    # user 0: 10 items, item 100+j at time 10-j (newest = smallest id): 6 / 2 / 2
    # user 1: 5 items at times 3, 1, 2, 3, 5: order 21, 22, 20, 23, 24 (20 and 23 tie: the larger
    #   id is the later) -> 3 / 1 / 1
    # user 2: 3 items -> round(1.8)=2 train, round(0.6)=1 valid, no test: not evaluated
    rows = [(0, 100 + j, 10 - j) for j in range(10)]
    rows += [(1, 20, 3), (1, 21, 1), (1, 22, 2), (1, 23, 3), (1, 24, 5)]
    rows += [(2, 30, 1), (2, 31, 2), (2, 32, 3)]
    d = timed(rows)
    s = kd.make_split(d, "full", order="temporal")
    assert original(d, s.train) == [[104, 105, 106, 107, 108, 109], [20, 21, 22], [30, 31]]
    assert original(d, s.valid) == [[102, 103], [23], [32]]
    assert original(d, s.test) == [[100, 101], [24], []]
    assert s.eval_users.tolist() == [0, 1] and s.protocol == "full" and s.order == "temporal"


def test_temporal_full_has_the_random_splits_sizes():
    rng = np.random.default_rng(0)
    d = kd.from_pairs(rng.integers(0, 60, 2000), rng.integers(0, 400, 2000), name="r",
                      timestamps=rng.integers(0, 50, 2000))  # fmt: skip
    t, r = kd.temporal_split(d), kd.random_split(d, seed=0)
    for a, b in ((t.train, r.train), (t.valid, r.valid), (t.test, r.test)):
        assert torch.equal(a[0], b[0])  # the same sizes per user
    assert torch.equal(t.eval_users, r.eval_users)
    times = d.timestamps.numpy()
    for u in range(d.n_users):  # every train time <= every valid time <= every test time
        a, b = d.indptr[u].item(), d.indptr[u + 1].item()
        when = dict(zip(d.indices[a:b].tolist(), times[a:b].tolist()))
        tr, va, te = (rows_of(p)[u] for p in (t.train, t.valid, t.test))
        if va:
            assert max(when[i] for i in tr) <= min(when[i] for i in va)
        if te:
            assert max(when[i] for i in tr + va) <= min(when[i] for i in te)


def test_temporal_needs_timestamps():
    d = kd.synthetic(60, 80, seed=0)
    for protocol in kd.PROTOCOLS:
        with pytest.raises(ValueError, match=r"order='temporal' needs timestamps.*'synthetic'"):
            kd.make_split(d, protocol, order="temporal", n_neg=5)
    with pytest.raises(ValueError, match="order must be one of"):
        kd.make_split(d, "loo", order="by-time")
    assert kd.PROTOCOLS == ("loo", "full") and kd.ORDERS == ("random", "temporal")


# ---------------------------------------------------------------- export / read
def to_rows(d, table, part):
    u_of = {v: k for k, v in enumerate(d.user_ids.tolist())}
    i_of = {v: k for k, v in enumerate(d.item_ids.tolist())}
    users, items = table[part]
    return [u_of[u] for u in users.tolist()], [i_of[i] for i in items.tolist()]


@pytest.mark.parametrize("name", ["split.csv", "split.csv.gz"])
@pytest.mark.parametrize("protocol, order", [("loo", "random"), ("loo", "temporal"),
                                             ("full", "temporal")])  # fmt: skip
def test_export_read_round_trip(tmp_path, name, protocol, order):
    d = timed(HAND)
    s = kd.make_split(d, protocol, order=order, n_neg=4, seed=1)
    path = kd.export_split(d, s, tmp_path / name)
    assert path == tmp_path / name and not list(tmp_path.glob(".*.part"))
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        kd.export_split(d, s, tmp_path / "again.csv.gz")
        assert (tmp_path / "again.csv.gz").read_bytes() == path.read_bytes()  # reproducible
    table = kd.read_split(path)
    for part in ("train", "valid", "test"):
        users, items = to_rows(d, table, part)
        n = d.n_users
        got = [sorted(i for u2, i in zip(users, items) if u2 == u) for u in range(n)]
        assert got == rows_of(getattr(s, part))
    if protocol == "loo":
        for part, cands in (("valid", s.valid_candidates), ("test", s.test_candidates)):
            users, items = to_rows(d, table, f"{part}_negative")
            assert users == np.repeat(s.eval_users.numpy(), 4).tolist()
            assert items == cands[:, 1:].reshape(-1).tolist()  # candidate order kept
    else:
        assert set(table) == {"train", "valid", "test"}


def test_export_joins_back_to_the_source_file(tmp_path):
    lines = [("ann", "the book, 2nd ed.", 5), ("ann", 'a "film"', 7), ("ann", "x", 1),
             ("bob", "x", 2), ("bob", "the book, 2nd ed.", 3), ("bob", "y", 9),
             ("cy", "x", 4), ("cy", "y", 8), ("cy", 'a "film"', 6)]  # fmt: skip
    src = tmp_path / "log.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp"])
        w.writerows(lines)
    d = kd.from_pairs(*zip(*[(u, i) for u, i, _ in lines]), name="log",
                      timestamps=[t for *_, t in lines])  # fmt: skip
    s = kd.make_split(d, "loo", order="temporal", n_neg=1)
    out = kd.export_split(d, s, tmp_path / "split.csv")
    with open(out, newline="") as f:
        exported = list(csv.DictReader(f))
    with open(src, newline="") as f:  # the user's file, as the user reads it
        source = {(r["user"], r["item"]): int(r["timestamp"]) for r in csv.DictReader(f)}
    held = {r["part"]: set() for r in exported}
    for r in exported:
        held[r["part"]].add((r["user_id"], r["item_id"]))
    assert held["train"] | held["valid"] | held["test"] == set(source)  # joins on the ids
    latest = {}  # each user's latest item
    for (u, i), t in source.items():
        latest[u] = max(latest.get(u, (t, i)), (t, i))
    assert held["test"] == {(u, i) for u, (_, i) in latest.items()}
    for r in exported:
        if r["part"].endswith("_negative"):
            assert (r["user_id"], r["item_id"]) not in source
    table = kd.read_split(out)
    assert table["test"][0].dtype.kind == "U" and set(zip(*table["test"])) == held["test"]


def test_export_of_a_loaded_ratings_file_joins_back(tmp_path):
    rng = np.random.default_rng(5)
    rows = {(int(u), int(i)): (int(r), int(t)) for u, i, r, t in zip(
        rng.integers(1, 30, 600), rng.integers(1, 90, 600) * 7, rng.integers(1, 6, 600),
        rng.integers(10**9, 2 * 10**9, 600))}  # fmt: skip
    src = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{r}.0,{t}\n" for (u, i), (r, t) in rows.items()))  # fmt: skip
    d = kd.load(str(src), min_user_interactions=3)
    s = kd.make_split(d, "full", order="temporal")
    out = kd.export_split(d, s, tmp_path / "out" / "split.csv.gz")
    with gzip.open(out, "rt", newline="") as f:
        exported = [(int(r["user_id"]), int(r["item_id"]), r["part"]) for r in csv.DictReader(f)]
    assert len(exported) == d.nnz
    for u, i, _ in exported:  # every row is a line of the source rated >= 4
        assert rows[(u, i)][0] >= 4
    kept = {(u, i) for (u, i), (r, _) in rows.items() if r >= 4}
    by_user = {}
    for u, i in kept:
        by_user.setdefault(u, set()).add(i)
    assert {(u, i) for u, i, _ in exported} == {
        (u, i) for u, items in by_user.items() if len(items) >= 3 for i in items
    }
    for u in {u for u, _, _ in exported}:  # train before test, in the source file's times
        train = [rows[(u, i)][1] for uu, i, p in exported if uu == u and p == "train"]
        test = [rows[(u, i)][1] for uu, i, p in exported if uu == u and p == "test"]
        assert not test or max(train) <= min(test)


def test_export_and_read_errors(tmp_path):
    d = timed(HAND)
    other = kd.synthetic(60, 80, seed=0)
    with pytest.raises(ValueError, match="other data"):
        kd.export_split(d, kd.make_split(other, "full"), tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kd.read_split(tmp_path / "missing.csv")
    bad = write(tmp_path, "bad.csv", "user,item,part\n1,2,train\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 1: expected the header"):
        kd.read_split(bad)
    bad = write(tmp_path, "bad2.csv", "user_id,item_id,part\n1,2,train\n1,3,holdout\n")
    with pytest.raises(ValueError, match=r"bad2.csv, line 3: part 'holdout'"):
        kd.read_split(bad)
    bad = write(tmp_path, "bad3.csv", "user_id,item_id,part\n1,2\n")
    with pytest.raises(ValueError, match=r"bad3.csv, line 2: expected 3 fields"):
        kd.read_split(bad)
    gz = tmp_path / "bad.csv.gz"
    gz.write_bytes(gzip.compress(b"user_id,item_id,part\n")[:12])
    with pytest.raises(ValueError, match="not a readable split file"):
        kd.read_split(gz)
    empty = kd.read_split(write(tmp_path, "empty.csv", "user_id,item_id,part\n"))
    assert set(empty) == {"train", "valid", "test"} and len(empty["train"][0]) == 0
