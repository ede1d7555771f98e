"""kdfast.data: loaders (incl. malformed files), filtering/remapping, synthetic data and split
invariants."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdfast import data as kd


def rows_of(csr):
    indptr, indices = csr
    return [indices[indptr[u] : indptr[u + 1]].tolist() for u in range(indptr.numel() - 1)]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- users.dat
def test_users_dat_loads_filters_and_remaps(tmp_path):
    p = write(tmp_path, "users.dat", "3 10 4 7\n1 4\n2 99 10\n4 4 5 5 10\n\n")
    d = kd.load_users_dat(p, min_user_interactions=2)
    # user 1 (one item) dropped; user 3 has a repeated item -> 3 distinct
    assert d.user_ids.tolist() == [0, 2, 3]
    assert d.item_ids.tolist() == [4, 5, 7, 10, 99]
    assert d.n_users == 3 and d.n_items == 5
    assert rows_of(d.csr) == [[0, 2, 3], [3, 4], [0, 1, 3]]
    assert d.indptr.dtype == torch.int64 and d.indices.dtype == torch.int64
    assert kd.load_users_dat(p, min_user_interactions=0).n_users == 4


@pytest.mark.parametrize(
    "text,line,what",
    [
        ("2 1 2\n3 1 2\n", 2, "count says 3"),
        ("2 1 2\n2 1 x\n", 2, "'x' is not an integer"),
        ("1 5\n1 -3\n", 2, "negative"),
        ("1 5\n\n1 3\n", 2, "empty line"),
        ("a 1\n", 1, "count 'a'"),
    ],
)
def test_users_dat_malformed_names_file_and_line(tmp_path, text, line, what):
    p = write(tmp_path, "users.dat", text)
    with pytest.raises(ValueError) as err:
        kd.load_users_dat(p, min_user_interactions=1)
    msg = str(err.value)
    assert str(p) in msg and f"line {line}" in msg and what in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kd.load_users_dat(tmp_path / "nope.dat")
    with pytest.raises(ValueError, match="empty"):
        kd.load_users_dat(write(tmp_path, "users.dat", "\n"))
    with pytest.raises(FileNotFoundError, match="neither"):
        kd.load(str(tmp_path / "missing.csv"))


def test_citeulike_path_resolution(tmp_path, monkeypatch):
    folder = tmp_path / "citeulike-t"
    folder.mkdir()
    write(folder, "users.dat", "1 3\n")
    monkeypatch.setenv("KDFAST_DATA", str(tmp_path))
    assert kd.citeulike_path() == folder / "users.dat"
    assert kd.citeulike_path(folder) == folder / "users.dat"
    with pytest.raises(FileNotFoundError, match="not found"):
        kd.citeulike_path(tmp_path / "elsewhere")
    monkeypatch.setenv("KDFAST_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("KDFAST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="KDFAST_DATA"):
        kd.citeulike_path(download=False)


def test_citeulike_download_checks_sha256(tmp_path, monkeypatch):
    import hashlib

    from kdfast.data import datasets

    src = write(tmp_path, "remote.dat", "2 1 2\n")
    monkeypatch.delenv("KDFAST_DATA", raising=False)
    monkeypatch.setenv("KDFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "CITEULIKE_URL", src.as_uri())
    monkeypatch.setattr(datasets, "CITEULIKE_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        kd.citeulike_path()
    # nothing half-downloaded kept
    assert not (tmp_path / "cache" / "citeulike-t" / "users.dat").exists()
    monkeypatch.setattr(datasets, "CITEULIKE_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())
    got = kd.citeulike_path()
    assert got == tmp_path / "cache" / "citeulike-t" / "users.dat" and got.read_text() == "2 1 2\n"
    assert kd.load_citeulike(min_user_interactions=1).nnz == 2


@pytest.mark.skipif(
    not os.environ.get("KDFAST_DATA"), reason="KDFAST_DATA not set (CiteULike-t users.dat)"
)
def test_real_citeulike_counts():
    path = kd.citeulike_path(download=False)
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == kd.CITEULIKE_SHA256
    full = kd.load_citeulike(path, min_user_interactions=0)
    assert (full.n_users, full.nnz, int(full.item_ids.max())) == (7947, 134860, 25974)
    d = kd.load_citeulike(path)
    assert (d.n_users, d.n_items) == (5219, 25181)


# ---------------------------------------------------------------- MovieLens, pairs
def test_movielens_formats_and_threshold(tmp_path):
    udata = write(tmp_path, "u.data", "1\t10\t5\t0\n1\t11\t3\t0\n2\t10\t4\t0\n2\t12\t4.5\t0\n")
    d = kd.load_movielens(udata, threshold=4, min_user_interactions=1)
    assert d.user_ids.tolist() == [1, 2] and d.item_ids.tolist() == [10, 12]
    assert rows_of(d.csr) == [[0], [0, 1]]
    dat = write(tmp_path, "ratings.dat", "1::10::5::0\n1::11::3::0\n2::10::4::0\n2::12::4::0\n")
    csv = write(
        tmp_path,
        "ratings.csv",
        "userId,movieId,rating,timestamp\n1,10,5.0,0\n1,11,3.0,0\n2,10,4.0,0\n2,12,4.0,0\n",
    )
    for p in (dat, csv):
        e = kd.load(str(p), min_user_interactions=1)
        assert rows_of(e.csr) == rows_of(d.csr)
    bad = write(
        tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,0\n1,11,great,0\n"
    )
    with pytest.raises(ValueError, match=r"ratings.csv, line 3: rating 'great'"):
        kd.load_movielens(bad)
    short = write(tmp_path, "u.data", "1\t10\t5\t0\n1\t11\n")
    with pytest.raises(ValueError, match="line 2: expected user, item, rating"):
        kd.load_movielens(short)


def test_pairs_header_separators_and_string_ids(tmp_path):
    csv = write(tmp_path, "inter.csv", "user,item\n5,1\n5,2\n7,2\n7,2\n")
    d = kd.load(str(csv), min_user_interactions=1)
    assert d.user_ids.tolist() == [5, 7] and rows_of(d.csr) == [[0, 1], [1]]
    tsv = write(tmp_path, "inter.tsv", "# comment\nalice\tbook\nbob\tbook\nalice\tpen\n")
    e = kd.load(str(tsv), min_user_interactions=1)
    assert e.user_ids.tolist() == ["alice", "bob"] and e.item_ids.tolist() == ["book", "pen"]
    assert rows_of(e.csr) == [[0, 1], [0]]
    bad = write(tmp_path, "bad.tsv", "1\t2\n3\n")
    with pytest.raises(ValueError, match=r"bad.tsv, line 2: expected at least two fields"):
        kd.load(str(bad), min_user_interactions=1)
    with pytest.raises(ValueError, match="fmt"):
        kd.load(str(bad), fmt="xml")


def test_from_pairs_rejects_all_filtered():
    with pytest.raises(ValueError, match="no interactions left"):
        kd.from_pairs([0, 1], [0, 0], name="tiny", min_user_interactions=2)


# ---------------------------------------------------------------- synthetic
def test_synthetic_seeded_power_law():
    a = kd.synthetic(300, 400, seed=3)
    b = kd.synthetic(300, 400, seed=3)
    c = kd.synthetic(300, 400, seed=4)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    counts = np.diff(a.indptr.numpy())
    assert counts.min() >= 5
    pop = np.sort(np.bincount(a.indices.numpy(), minlength=a.n_items))[::-1]
    assert pop[0] > 5 * np.median(pop)  # heavy head


# ---------------------------------------------------------------- splits
def check_split_invariants(d, s):
    all_rows = rows_of(d.csr)
    tr, va, te = rows_of(s.train), rows_of(s.valid), rows_of(s.test)
    for u in range(d.n_users):
        assert sorted(tr[u] + va[u] + te[u]) == all_rows[u]  # a partition, nothing lost or added
        assert (
            not set(tr[u]) & set(va[u])
            and not set(tr[u]) & set(te[u])
            and not set(va[u]) & set(te[u])
        )
        assert len(tr[u]) >= 1
    assert s.data_fingerprint == d.fingerprint()


def test_leave_one_out_invariants():
    d = kd.synthetic(120, 300, seed=1)
    s = kd.leave_one_out(d, n_neg=50, seed=7)
    check_split_invariants(d, s)
    all_rows = rows_of(d.csr)
    assert s.eval_users.tolist() == list(range(d.n_users))  # every user has >= 5 items
    assert s.valid_candidates.shape == s.test_candidates.shape == (d.n_users, 51)
    va, te = rows_of(s.valid), rows_of(s.test)
    for r, u in enumerate(s.eval_users.tolist()):
        for cand, held in ((s.valid_candidates[r], va[u]), (s.test_candidates[r], te[u])):
            assert [int(cand[0])] == held
            negs = cand[1:].tolist()
            assert len(set(negs)) == 50 and not set(negs) & set(all_rows[u])
    again = kd.leave_one_out(d, n_neg=50, seed=7)
    assert torch.equal(again.test_candidates, s.test_candidates) and torch.equal(
        again.train[1], s.train[1]
    )
    other = kd.leave_one_out(d, n_neg=50, seed=8)
    assert not torch.equal(other.test_candidates, s.test_candidates)


def test_leave_one_out_small_users_and_bad_n_neg():
    d = kd.from_pairs([0, 0, 1, 1, 1], [0, 1, 0, 1, 2], name="t", min_user_interactions=1)
    with pytest.raises(ValueError, match="n_neg"):
        kd.leave_one_out(d, n_neg=5)
    tiny = kd.from_pairs(
        [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3],
        [0, 1, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6],
        name="t",
        min_user_interactions=1,
    )
    s = kd.leave_one_out(tiny, n_neg=2, seed=0)
    assert s.eval_users.tolist() == [1, 2, 3]  # user 0 has 2 items: training only
    assert rows_of(s.train)[0] == [0, 1]


def test_random_split_proportions_and_seed():
    d = kd.synthetic(200, 300, seed=2)
    s = kd.random_split(d, seed=0)
    check_split_invariants(d, s)
    n_tr, n_va, n_te = (s.train[1].numel(), s.valid[1].numel(), s.test[1].numel())
    total = n_tr + n_va + n_te
    assert abs(n_tr / total - 0.6) < 0.03 and abs(n_va / total - 0.2) < 0.03
    assert torch.equal(kd.random_split(d, seed=0).test[1], s.test[1])
    assert not torch.equal(kd.random_split(d, seed=1).test[1], s.test[1])
    with pytest.raises(ValueError, match="fractions"):
        kd.random_split(d, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="protocol"):
        kd.make_split(d, "kfold")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 12), st.integers(0, 30)), min_size=1, max_size=120),
    st.integers(0, 3),
    st.integers(0, 2**31 - 1),
)
def test_property_pairs_to_splits(pairs, min_int, seed):
    users = [u for u, _ in pairs]
    items = [i for _, i in pairs]
    distinct = {}
    for u, i in pairs:
        distinct.setdefault(u, set()).add(i)
    kept = {u: s for u, s in distinct.items() if len(s) >= min_int}
    if not kept:
        with pytest.raises(ValueError):
            kd.from_pairs(users, items, name="p", min_user_interactions=min_int)
        return
    d = kd.from_pairs(users, items, name="p", min_user_interactions=min_int)
    assert d.user_ids.tolist() == sorted(kept)
    got = {
        int(d.user_ids[u]): {int(d.item_ids[i]) for i in row}
        for u, row in enumerate(rows_of(d.csr))
    }
    assert got == kept
    for row in rows_of(d.csr):
        assert row == sorted(set(row))

    def n_test(n):
        n_tr = max(1, int(round(0.6 * n)))
        return n - n_tr - min(n - n_tr, int(round(0.2 * n)))

    if all(n_test(len(r)) == 0 for r in rows_of(d.csr)):
        with pytest.raises(ValueError, match="no user has a test item"):
            kd.random_split(d, seed=seed)
        return
    check_split_invariants(d, kd.random_split(d, seed=seed))


def split_digest(s):
    """sha256 (16 hex digits) of a split's parts, evaluated users and candidates."""
    import hashlib

    h = hashlib.sha256()
    for part in (s.train, s.valid, s.test):
        for t in part:
            h.update(t.numpy().astype(np.int64).tobytes())
    h.update(s.eval_users.numpy().tobytes())
    if s.valid_candidates is not None:
        h.update(s.valid_candidates.numpy().tobytes())
        h.update(s.test_candidates.numpy().tobytes())
    return h.hexdigest()[:16]


def test_random_splits_are_pinned():
    """The random splits (and the data fingerprint) are those of every earlier release: a saved
    teacher's split is rebuilt bit for bit. Values recorded before timestamps and temporal splits
    were added."""
    d = kd.synthetic(200, 300, seed=2)
    assert d.fingerprint() == "09456ea7e7dee367" and d.timestamps is None
    loo = kd.make_split(d, "loo", seed=0, n_neg=20)
    assert split_digest(loo) == "a0ed75839f2f14ed" and loo.order == "random"
    assert loo.test[1][:6].tolist() == [160, 258, 66, 90, 52, 41]
    assert loo.test_candidates[0, :6].tolist() == [160, 37, 2, 157, 194, 77]
    full = kd.make_split(d, "full", seed=0)
    assert split_digest(full) == "ab5e7d12e1e733d5"
    assert full.test[1][:6].tolist() == [8, 55, 132, 136, 230, 274]
    assert full.describe()["order"] == "random" and full.data_fingerprint == d.fingerprint()
