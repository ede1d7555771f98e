"""Train / validation / test splits of Interactions (docs/METHODS.md section 1).

leave_one_out: per user one validation and one test item held out at random; each is ranked among
    n_neg (499) items sampled uniformly, without replacement, from the items the user never
    interacted with (500 candidates). Users with fewer than 3 interactions stay entirely in training
    and are not evaluated.
random_split: per user a random 60% / 20% / 20% of the items for train / valid / test (HetComp's
    full-ranking protocol, seed 0); at least one training item per user.
Both are seeded (numpy PCG64) and deterministic, independent of torch's global state.

Temporal orders (make_split(..., order="temporal"); the data must have timestamps):
leave_last_out: per user (with >= 3 items) the latest interaction is the test item and the second
    latest the validation item; negatives sampled as in leave_one_out (same seed, same rule).
temporal_split: per user the items sorted by time, the earliest 60% train, the next 20% valid,
    the latest 20% test, with random_split's rounding (train gets round(0.6 n) but at least one,
    valid round(0.2 n) of what is left, test the rest; Python's round, half to even).
Ties in time are broken by the item's row id (= the sorted order of the original item ids): of two
items with the same time, the larger id counts as the later one. A temporal split records
Interactions.fingerprint(timestamps=True) as its data_fingerprint.

export_split / read_split: a split as a CSV of original ids (user_id,item_id,part), see
export_split.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._core.csr import from_lists
from .._core.files import atomic_write
from .datasets import Interactions

PROTOCOLS = ("loo", "full")
ORDERS = ("random", "temporal")


@dataclass(frozen=True)
class Split:
    """A split of one data set.

    protocol: "loo" (leave-one-out with sampled candidates) or "full" (full-ranking).
    train, valid, test: int64 CSR pairs (indptr [n_users + 1], indices), rows sorted.
    eval_users: int64 [n_eval] users that have validation/test items.
    valid_candidates, test_candidates (loo only): int64 [n_eval, 1 + n_neg]; column 0 is the
        held-out item, the rest are the sampled unobserved items.
    seed: the split's seed; data_fingerprint: Interactions.fingerprint() of the data split
        (fingerprint(timestamps=True) for a temporal split).
    order: "random" or "temporal" (held-out items chosen at random or by time).
    """

    protocol: str
    n_users: int
    n_items: int
    train: tuple
    valid: tuple
    test: tuple
    eval_users: torch.Tensor
    seed: int
    data_fingerprint: str
    valid_candidates: torch.Tensor | None = None
    test_candidates: torch.Tensor | None = None
    order: str = "random"

    @property
    def n_train(self) -> int:
        return int(self.train[1].numel())

    def describe(self) -> dict:
        d = {
            "protocol": self.protocol,
            "order": self.order,
            "seed": self.seed,
            "train": self.n_train,
            "valid": int(self.valid[1].numel()),
            "test": int(self.test[1].numel()),
            "eval_users": int(self.eval_users.numel()),
            "data_fingerprint": self.data_fingerprint,
        }
        if self.valid_candidates is not None:
            d["candidates"] = int(self.valid_candidates.shape[1])
        return d


def _sample_unobserved(rng, n_items, observed_sorted, n):
    """n distinct items in [0, n_items) not in observed_sorted (rejection sampling, then a fallback
    through the complement when rejections are frequent)."""
    free = n_items - len(observed_sorted)
    if free < n:
        raise ValueError(
            f"n_neg={n} negatives requested but a user has only {free} unobserved items"
        )
    if free < 2 * n:
        comp = np.setdiff1d(np.arange(n_items), observed_sorted, assume_unique=True)
        return rng.choice(comp, size=n, replace=False)
    out = np.zeros(0, dtype=np.int64)
    while len(out) < n:
        draw = rng.integers(0, n_items, size=2 * n)
        pos = np.searchsorted(observed_sorted, draw)
        hit = (pos < len(observed_sorted)) & (
            observed_sorted[np.minimum(pos, len(observed_sorted) - 1)] == draw
        )
        draw = np.concatenate([out, draw[~hit]])
        _, first = np.unique(draw, return_index=True)
        out = draw[np.sort(first)]
    return out[:n]


def _need_timestamps(data: Interactions, what: str) -> np.ndarray:
    if data.timestamps is None:
        raise ValueError(
            f"{what}: order='temporal' needs timestamps, but the data {data.name!r} "
            f"(from {data.source or 'memory'}) has none: users.dat files and synthetic data have "
            "none; a ratings file has them in a 4th column, a pairs or RecBole .inter file in a "
            "column its header names 'timestamp' (see kdfast.data.datasets)"
        )
    return data.timestamps.numpy()


def _by_time(items, times):
    """items ordered by (time, item id): oldest first, ties by the smaller id first."""
    return items[np.lexsort((items, times))]


def _held_out(data: Interactions, n_neg: int, seed: int, order: str, pick_two) -> Split:
    """The leave-one-out family: pick_two(rng, u, items) gives the positions (in the user's sorted
    row) of the validation and the test item; then n_neg negatives for each, in that order."""
    if n_neg < 1:
        raise ValueError(f"n_neg must be >= 1, got {n_neg}")
    rng = np.random.default_rng(seed)
    indptr, indices = data.indptr.numpy(), data.indices.numpy()
    train_rows, valid_rows, test_rows = [], [], []
    eval_users, vc, tc = [], [], []
    for u in range(data.n_users):
        items = indices[indptr[u] : indptr[u + 1]]
        if len(items) < 3:
            train_rows.append(items)
            valid_rows.append([])
            test_rows.append([])
            continue
        pick = pick_two(rng, u, items)
        v, t = items[pick[0]], items[pick[1]]
        train_rows.append(np.delete(items, pick))
        valid_rows.append([v])
        test_rows.append([t])
        eval_users.append(u)
        vc.append(np.concatenate([[v], _sample_unobserved(rng, data.n_items, items, n_neg)]))
        tc.append(np.concatenate([[t], _sample_unobserved(rng, data.n_items, items, n_neg)]))
    if not eval_users:
        what = "leave_one_out" if order == "random" else "leave_last_out"
        raise ValueError(f"{what}: no user has >= 3 interactions")
    return Split(
        "loo",
        data.n_users,
        data.n_items,
        from_lists(train_rows, data.n_users),
        from_lists(valid_rows, data.n_users),
        from_lists(test_rows, data.n_users),
        torch.tensor(eval_users, dtype=torch.int64),
        seed,
        data.fingerprint(timestamps=order == "temporal"),
        torch.from_numpy(np.stack(vc).astype(np.int64)),
        torch.from_numpy(np.stack(tc).astype(np.int64)),
        order=order,
    )


def leave_one_out(data: Interactions, *, n_neg: int = 499, seed: int = 0) -> Split:
    """Leave-one-out split: per user (with >= 3 items) one random validation and one random test
    item, each with n_neg sampled unobserved negatives."""
    return _held_out(
        data, n_neg, seed, "random", lambda rng, u, items: rng.choice(len(items), 2, replace=False)
    )


def leave_last_out(data: Interactions, *, n_neg: int = 499, seed: int = 0) -> Split:
    """Temporal leave-one-out: per user (with >= 3 items) the latest interaction is the test item,
    the second latest the validation item (ties in time: the larger item id is the later), each
    with n_neg sampled unobserved negatives (seeded as in leave_one_out). ValueError without
    timestamps."""
    times = _need_timestamps(data, "leave_last_out")
    indptr = data.indptr.numpy()

    def latest_two(rng, u, items):
        rank = np.lexsort((items, times[indptr[u] : indptr[u + 1]]))  # oldest first
        return np.array([rank[-2], rank[-1]])

    return _held_out(data, n_neg, seed, "temporal", latest_two)


def _check_fractions(fractions) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or abs(f.sum() - 1.0) > 1e-9 or f[0] <= 0:
        raise ValueError(
            "fractions must be three non-negative numbers summing to 1 with train > 0, "
            f"got {fractions}"
        )
    return f


def _fraction_split(data: Interactions, f, seed: int, order: str, arrange) -> Split:
    """Per user, the items in arrange(u, items)'s order cut into train / valid / test by f."""
    indptr, indices = data.indptr.numpy(), data.indices.numpy()
    tr, va, te, eval_users = [], [], [], []
    for u in range(data.n_users):
        items = arrange(u, indices[indptr[u] : indptr[u + 1]])
        n = len(items)
        n_tr = max(1, int(round(f[0] * n)))
        n_va = min(n - n_tr, int(round(f[1] * n)))
        tr.append(items[:n_tr])
        va.append(items[n_tr : n_tr + n_va])
        te.append(items[n_tr + n_va :])
        if n - n_tr - n_va > 0:
            eval_users.append(u)
    if not eval_users:
        what = "random_split" if order == "random" else "temporal_split"
        raise ValueError(f"{what}: no user has a test item")
    return Split(
        "full",
        data.n_users,
        data.n_items,
        from_lists(tr, data.n_users),
        from_lists(va, data.n_users),
        from_lists(te, data.n_users),
        torch.tensor(eval_users, dtype=torch.int64),
        seed,
        data.fingerprint(timestamps=order == "temporal"),
        order=order,
    )


def random_split(data: Interactions, *, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> Split:
    """Per-user random split into train / valid / test by the given fractions (rounded; train gets
    at least one item and the remainder goes to test). Evaluated users: those with a test item."""
    f = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    return _fraction_split(data, f, seed, "random", lambda u, items: rng.permutation(items))


def temporal_split(data: Interactions, *, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> Split:
    """Per-user temporal split: the user's items sorted by (time, item id), the earliest
    fractions[0] train, the next fractions[1] valid, the latest rest test, rounded as in
    random_split. Deterministic (seed is only recorded). ValueError without timestamps."""
    f = _check_fractions(fractions)
    times = _need_timestamps(data, "temporal_split")
    indptr = data.indptr.numpy()
    return _fraction_split(
        data,
        f,
        seed,
        "temporal",
        lambda u, items: _by_time(items, times[indptr[u] : indptr[u + 1]]),
    )


def make_split(
    data: Interactions, protocol: str, *, seed: int = 0, n_neg: int = 499, order: str = "random"
) -> Split:
    """protocol "loo": leave_one_out (order "random") or leave_last_out ("temporal"); "full":
    random_split or temporal_split (60/20/20)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'loo' or 'full', got {protocol!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if protocol == "loo":
        fn = leave_one_out if order == "random" else leave_last_out
        return fn(data, n_neg=n_neg, seed=seed)
    fn = random_split if order == "random" else temporal_split
    return fn(data, seed=seed)


SPLIT_COLUMNS = ("user_id", "item_id", "part")
SPLIT_PARTS = ("train", "valid", "test", "valid_negative", "test_negative")


def _rows_cols(csr):
    indptr, indices = (t.numpy() for t in csr)
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr)), indices


def export_split(dataset: Interactions, split: Split, path, *, negatives: bool = True) -> Path:
    """Write `split` of `dataset` as a CSV with the header user_id,item_id,part and one row per
    (user, item) in the ORIGINAL ids (dataset.user_ids / item_ids), so it joins back to the source
    file: part is "train", "valid" or "test"; for a loo split (with negatives=True) also
    "valid_negative" / "test_negative", one row per sampled negative of each evaluated user, in
    candidate order (the held-out item itself is its "valid" / "test" row). Rows come part by
    part, users in row order, items in id order. (users.dat data has no user ids: a user's id is
    its 0-based line number.) Gzip-compressed when the name ends in ".gz"
    (reproducibly: no time or name in the gzip header). Written atomically (a reader never sees
    half a file). Returns the path. ValueError when the split is not of this dataset."""
    fps = (dataset.fingerprint(), dataset.fingerprint(timestamps=True))
    if (split.n_users, split.n_items) != (dataset.n_users, dataset.n_items) or (
        split.data_fingerprint not in fps
    ):
        raise ValueError(
            f"export_split: the split is of other data (fingerprint {split.data_fingerprint}, "
            f"{split.n_users} users, {split.n_items} items) than {dataset.name!r} "
            f"({fps[0]}, {dataset.n_users} users, {dataset.n_items} items)"
        )
    parts = [(name, *_rows_cols(getattr(split, name))) for name in ("train", "valid", "test")]
    if negatives and split.valid_candidates is not None:
        for name, cands in (
            ("valid_negative", split.valid_candidates),
            ("test_negative", split.test_candidates),
        ):
            negs = cands[:, 1:].numpy()
            rows = np.repeat(split.eval_users.numpy(), negs.shape[1])
            parts.append((name, rows, negs.reshape(-1)))

    plain = dataset.user_ids.dtype.kind in "iu" and dataset.item_ids.dtype.kind in "iu"

    def write_rows(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(SPLIT_COLUMNS)
        for name, rows, cols in parts:
            for a in range(0, len(rows), 1 << 18):  # bounded memory for millions of negatives
                users = dataset.user_ids[rows[a : a + (1 << 18)]].tolist()
                items = dataset.item_ids[cols[a : a + (1 << 18)]].tolist()
                if plain:  # integer ids need no quoting: the faster way
                    f.write("".join(f"{u},{i},{name}\n" for u, i in zip(users, items)))
                else:
                    w.writerows(zip(users, items, [name] * len(users)))

    def write(tmp):
        if str(path).endswith(".gz"):
            with open(tmp, "wb") as raw:
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0
                ) as gz:
                    with io.TextIOWrapper(gz, encoding="utf-8", newline="") as f:
                        write_rows(f)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                write_rows(f)

    return atomic_write(path, write)


def read_split(path) -> dict:
    """Read a file written by export_split: {part: (user_ids, item_ids)}, numpy arrays in the
    file's order, for "train", "valid", "test" (always present, maybe empty) and
    "valid_negative" / "test_negative" when the file has them. A column's ids are int64 when all
    of them are integers (as load_pairs reads ids), else strings. Gzip is recognised by content.
    Raises FileNotFoundError for a missing file and ValueError naming the file and line for a
    wrong header, a row without three fields or an unknown part."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        try:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != SPLIT_COLUMNS:
                raise ValueError(
                    f"{path}, line 1: expected the header {','.join(SPLIT_COLUMNS)}, got "
                    f"{','.join(header) if header else 'an empty file'!r}"
                )
            code = {name: k for k, name in enumerate(SPLIT_PARTS)}
            users, items, parts = [], [], []
            for row in reader:
                if len(row) == 3 and row[2] in code:
                    users.append(row[0])
                    items.append(row[1])
                    parts.append(code[row[2]])
                elif row:
                    what = (
                        f"part {row[2]!r} is not one of {SPLIT_PARTS}"
                        if len(row) == 3
                        else f"expected 3 fields (user_id,item_id,part), got {len(row)}"
                    )
                    raise ValueError(f"{path}, line {reader.line_num}: {what}")
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, csv.Error) as exc:
            raise ValueError(f"{path}: not a readable split file ({exc})") from None

    def typed(ids):  # int64 when every id is an integer that fits, as load_pairs reads ids
        arr = np.asarray(ids, dtype=str)
        if all(x.lstrip("-").isdigit() for x in set(ids)):
            try:
                return arr.astype(np.int64)
            except (ValueError, OverflowError):
                pass
        return arr

    users, items, parts = typed(users), typed(items), np.asarray(parts, dtype=np.int8)
    out = {}
    for k, name in enumerate(SPLIT_PARTS):
        mask = parts == k
        if mask.any() or name in ("train", "valid", "test"):
            out[name] = (users[mask], items[mask])
    return out
