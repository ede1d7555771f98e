"""Interaction data sets: loaders for CiteULike-t, MovieLens and generic user-item files, a seeded
synthetic generator, filtering by minimum interactions, id remapping and the CSR form.

Every loader returns an `Interactions`: implicit feedback of n_users users on n_items items as an
int64 CSR pair (indptr [n_users + 1], indices [nnz]) with each row's item ids sorted and unique.
Original ids are kept (user_ids, item_ids) so results can be mapped back. A malformed file raises a
ValueError that names the file, the line number and what is wrong, before anything is returned
(nothing half-loaded).

Filters (applied in this order by from_pairs, so by every loader):
  min_user_interactions=m: users with fewer than m distinct items are dropped, in ONE pass (the
      default, m=5, docs/METHODS.md section 1). Items are not filtered, and a kept user keeps all
      its items, so no further user is dropped.
  k_core=k (None by default: off): then, repeatedly, every user with fewer than k distinct items
      and every item with fewer than k distinct users is dropped, until no more is: what remains
      is the k-core (every user and every item has >= k interactions; empty raises ValueError). It
      does not depend on the removal order. With k >= m the result is the k-core of the unfiltered
      data.

Timestamps: `Interactions.timestamps` is the time of every interaction (aligned with `indices`),
or None when the source has none. They are read from a ratings file's 4th column (MovieLens
u.data, ratings.dat; headerless files only when every line has a numeric 4th field), and from a
header-named column ("timestamp", "time", "ts", RecBole's "timestamp:float", ...) of a file with
a header: after the rating in a ratings file (ratings.csv, a RecBole .inter with ratings), after
the item in a pairs file (a RecBole .inter without ratings; pairs files have a header only above
integer ids). A pairs file without a header has none (a third column could be a count or a
weight). users.dat files and synthetic data have none. int64 when every value is an integer,
float64 otherwise. A pair that occurs on several lines is one interaction with the LATEST of its
timestamps (for ratings: the latest among the lines rated >= threshold). A declared timestamp
column with a value that is not a finite number is reported by a warning naming the file and line,
and the data is loaded without timestamps (everything but a temporal split works).

Fingerprint: Interactions.fingerprint() hashes the sizes and the CSR only, as it always has, so
the fingerprint of a file (and the teachers saved for it) is the same whether or not it has
timestamps; fingerprint(timestamps=True) also hashes the timestamps when there are some (equal to
fingerprint() when there are none). A temporal split records the latter, as its parts depend on
the times.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._core import progress

CITEULIKE_URL = "https://raw.githubusercontent.com/js05212/citeulike-t/master/users.dat"
CITEULIKE_SHA256 = "02d5d429b2c0362e0ed79f6ef204666b4092563d21493abf4dfb521e8a7078bf"


@dataclass(frozen=True)
class Interactions:
    """Implicit user-item interactions in CSR form.

    name: a short label ("citeulike-t", "synthetic", a file name).
    n_users, n_items: sizes after filtering and remapping (ids are 0..n-1).
    indptr: int64 [n_users + 1]; indices: int64 [nnz], each row's item ids sorted and unique.
    user_ids, item_ids: the original id of every remapped user / item (numpy arrays).
    source: where the data came from (path, URL or generator parameters).
    timestamps: None, or int64 / float64 [nnz]: the time of each interaction, aligned with
        `indices` (a pair seen several times has its latest time).
    """

    name: str
    n_users: int
    n_items: int
    indptr: torch.Tensor
    indices: torch.Tensor
    user_ids: np.ndarray = field(repr=False)
    item_ids: np.ndarray = field(repr=False)
    source: str = ""
    timestamps: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        t = self.timestamps
        if t is not None and (
            not isinstance(t, torch.Tensor)
            or t.dtype not in (torch.int64, torch.float64)
            or t.shape != self.indices.shape
        ):
            raise ValueError(
                f"{self.name}: timestamps must be None or an int64/float64 tensor shaped like "
                f"indices {tuple(self.indices.shape)}, got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def csr(self):
        return self.indptr, self.indices

    @property
    def has_timestamps(self) -> bool:
        return self.timestamps is not None

    def fingerprint(self, *, timestamps: bool = False) -> str:
        """sha256 (first 16 hex digits) of the sizes and the CSR: equal data <=> equal
        fingerprint.

        timestamps=True also hashes the timestamps (their dtype and values) when the data has
        them; without timestamps it is the same as fingerprint(). The default leaves them out, so
        the fingerprint of a file is what it was before timestamps were read (saved teachers stay
        valid); a temporal split records fingerprint(timestamps=True), since its parts depend on
        the times."""
        h = hashlib.sha256()
        h.update(np.array([self.n_users, self.n_items], dtype=np.int64).tobytes())
        h.update(self.indptr.numpy().astype(np.int64).tobytes())
        h.update(self.indices.numpy().astype(np.int64).tobytes())
        if timestamps and self.timestamps is not None:
            t = self.timestamps.numpy()
            h.update(b"timestamps:" + t.dtype.str.encode())
            h.update(np.ascontiguousarray(t).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        d = {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.nnz,
            "fingerprint": self.fingerprint(),
            "source": self.source,
        }
        if self.timestamps is not None:
            d["timestamps"] = True
        return d


def _check_k_core(k_core):
    if k_core is not None and (
        isinstance(k_core, bool) or not isinstance(k_core, (int, np.integer)) or k_core < 1
    ):
        raise ValueError(f"k_core must be None or an integer >= 1, got {k_core!r}")


def from_pairs(
    users,
    items,
    *,
    name: str,
    source: str = "",
    min_user_interactions: int = 1,
    min_item_interactions: int = 1,
    timestamps=None,
    k_core: int | None = None,
) -> Interactions:
    """Build Interactions from parallel arrays of original user and item ids (ints or strings).

    Duplicate pairs count once (with the latest of their timestamps when `timestamps`, an array
    of numbers parallel to users, is given). Users with fewer than min_user_interactions distinct
    items are dropped, then items with fewer than min_item_interactions users (one pass each, in
    that order; docs/METHODS.md section 1 filters users only), then, when k_core=k is given, users
    and items with fewer than k interactions repeatedly until none is left (the k-core). Remaining
    ids are remapped to 0..n-1 in the sorted order of the original ids.
    """
    users = np.asarray(users)
    items = np.asarray(items)
    if users.shape != items.shape or users.ndim != 1:
        raise ValueError(
            "users and items must be 1-D arrays of the same length, "
            f"got {users.shape} and {items.shape}"
        )
    if min_user_interactions < 0 or min_item_interactions < 0:
        raise ValueError("min_user_interactions and min_item_interactions must be >= 0")
    _check_k_core(k_core)
    ts = None
    if timestamps is not None:
        ts = np.asarray(timestamps)
        if ts.shape != users.shape:
            raise ValueError(
                f"timestamps must be parallel to users and items ({users.shape}), got {ts.shape}"
            )
        if ts.dtype.kind in "iu":
            ts = ts.astype(np.int64)
        elif ts.dtype.kind == "f":
            ts = ts.astype(np.float64)
            if not np.isfinite(ts).all():
                raise ValueError(f"{name}: timestamps must be finite numbers")
        else:
            raise ValueError(f"{name}: timestamps must be numbers, got dtype {ts.dtype}")
    u_orig, u_code = np.unique(users, return_inverse=True)
    i_orig, i_code = np.unique(items, return_inverse=True)
    ni = max(len(i_orig), 1)
    raw = u_code.astype(np.int64).reshape(-1) * ni + i_code.reshape(-1)
    if ts is None:
        key = np.unique(raw)
    else:  # sorted by pair, then time: the last of each pair's run is its latest time
        order = np.lexsort((ts, raw))
        raw, ts = raw[order], ts[order]
        last = np.ones(len(raw), dtype=bool)
        last[:-1] = raw[1:] != raw[:-1]
        key, ts = raw[last], ts[last]
    u_code, i_code = key // ni, key % ni
    counts = np.bincount(u_code, minlength=len(u_orig))
    keep = counts[u_code] >= min_user_interactions
    u_code, i_code = u_code[keep], i_code[keep]
    ts = None if ts is None else ts[keep]
    if min_item_interactions > 1:
        icounts = np.bincount(i_code, minlength=len(i_orig))
        keep = icounts[i_code] >= min_item_interactions
        u_code, i_code = u_code[keep], i_code[keep]
        ts = None if ts is None else ts[keep]
    while k_core is not None and len(u_code):
        ucounts = np.bincount(u_code, minlength=len(u_orig))
        icounts = np.bincount(i_code, minlength=len(i_orig))
        keep = (ucounts[u_code] >= k_core) & (icounts[i_code] >= k_core)
        if keep.all():
            break
        u_code, i_code = u_code[keep], i_code[keep]
        ts = None if ts is None else ts[keep]
    u_kept, u_new = np.unique(u_code, return_inverse=True)
    i_kept, i_new = np.unique(i_code, return_inverse=True)
    n_users, n_items = len(u_kept), len(i_kept)
    if n_users == 0 or n_items == 0:
        core = f", k_core={k_core}" if k_core is not None else ""
        raise ValueError(
            f"{name}: no interactions left after filtering "
            f"(min_user_interactions={min_user_interactions}{core})"
        )
    order = np.lexsort((i_new, u_new))
    u_new, i_new = u_new[order], i_new[order]
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(u_new, minlength=n_users))
    return Interactions(
        name=name,
        n_users=n_users,
        n_items=n_items,
        indptr=torch.from_numpy(indptr),
        indices=torch.from_numpy(i_new.astype(np.int64)),
        user_ids=u_orig[u_kept],
        item_ids=i_orig[i_kept],
        source=source,
        timestamps=None if ts is None else torch.from_numpy(np.ascontiguousarray(ts[order])),
    )


def _bad(path, lineno, what):
    return ValueError(f"{path}, line {lineno}: {what}")


def _int_token(tok, path, lineno, what):
    try:
        v = int(tok)
    except ValueError:
        raise _bad(path, lineno, f"{what} {tok!r} is not an integer") from None
    if v < 0:
        raise _bad(path, lineno, f"{what} {v} is negative")
    if v >= 2**63:
        raise _bad(path, lineno, f"{what} {v} does not fit in a 64-bit integer")
    return v


def _read_lines(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            return f.read().splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a UTF-8 text file ({exc})") from None


def read_users_dat(path):
    """The CSR (indptr, indices), int64 numpy arrays, of a users.dat file: line r (0-based row r) is
    "count id id ..." with `count` ids after it ("0" for a row without ids). Trailing empty lines
    are ignored. The one parser of the format (data sets and `kdfast topk --exclude`).

    Raises FileNotFoundError for a missing file and ValueError naming the file and line for a count
    that does not match, a non-integer or negative id, an empty line inside the file, or no line.
    """
    lines = _read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: the file is empty")
    indptr, indices = [0], []
    for lineno, line in progress.lines(lines, path):
        toks = line.split()
        if not toks:
            raise _bad(path, lineno, "empty line (expected 'count id id ...'; write 0 for no ids)")
        count = _int_token(toks[0], path, lineno, "count")
        ids = [_int_token(t, path, lineno, "id") for t in toks[1:]]
        if len(ids) != count:
            raise _bad(path, lineno, f"the count says {count} ids but {len(ids)} ids follow")
        indices.extend(ids)
        indptr.append(len(indices))
    return np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64)


def load_users_dat(
    path, *, name: str = "citeulike-t", min_user_interactions: int = 5, k_core: int | None = None
) -> Interactions:
    """Load a CiteULike-style users.dat (see read_users_dat): line u is user u's items. Users with
    zero items may appear. No timestamps."""
    indptr, items = read_users_dat(path)
    users = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    return from_pairs(
        users,
        items,
        name=name,
        source=str(path),
        min_user_interactions=min_user_interactions,
        k_core=k_core,
    )


def _is_time_name(name: str) -> bool:
    """A header column that holds timestamps: "timestamp", "time", "ts", "unixReviewTime",
    RecBole's "timestamp:float" (the ":type" suffix is ignored), case-insensitive."""
    n = name.split(":")[0].strip().lower()
    return n == "ts" or "time" in n


def _time_column(names, first: int):
    """The index (>= first) of the first time-like header name, or None."""
    return next((k for k in range(first, len(names)) if _is_time_name(names[k])), None)


def _parse_times(path, tokens, linenos, declared: bool):
    """int64 (all integers) or float64 array of timestamp tokens, or None. A missing (None) or
    malformed token gives None, with a warning naming the line when the column was declared by a
    header."""

    def give_up(k, what):
        if declared:
            warnings.warn(
                f"{path}, line {linenos[k]}: {what}; the data is loaded without timestamps "
                "(a temporal split is not possible)",
                stacklevel=3,
            )
        return None

    if not tokens:
        return None
    missing = next((k for k, t in enumerate(tokens) if t is None or not t), None)
    if missing is not None:
        return give_up(missing, "no timestamp in the timestamp column")
    try:
        return np.asarray(tokens).astype(np.int64)
    except (ValueError, OverflowError):
        pass
    values = []
    for k, t in enumerate(tokens):
        try:
            v = float(t)
        except ValueError:
            v = float("nan")
        if not np.isfinite(v):
            return give_up(k, f"timestamp {t!r} is not a finite number")
        values.append(v)
    return np.asarray(values, dtype=np.float64)


def _separator(line: str):
    return "::" if "::" in line else "\t" if "\t" in line else "," if "," in line else None


def _is_number(t: str) -> bool:
    try:
        float(t)
    except ValueError:
        return False
    return True


def sniff_format(path, n_lines: int = 200) -> dict:
    """The format of a data file from its content (its first n_lines data lines), not its name:
    {"format": "users-dat" | "movielens" | "pairs", "sep": separator or None (whitespace),
    "header": bool, "why": a sentence}. users-dat: every line is "count id id ..." with the count
    right; movielens (ratings): a header naming a rating column, or a third field that is a
    number in [0, 10] on every line (user item rating [timestamp]) unless a header names that
    third column a time; pairs otherwise. Reads only those lines, not the whole file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    sample = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip() and not line.lstrip().startswith("#"):
                    sample.append(line)
                    if len(sample) == n_lines:
                        break
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a UTF-8 text file ({exc})") from None
    if not sample:
        return {"format": "pairs", "sep": None, "header": False, "why": "no data lines"}

    def counted(line):
        toks = line.split()
        return all(t.isdigit() for t in toks) and int(toks[0]) == len(toks) - 1

    if all(counted(ln) for ln in sample) and any(len(ln.split()) > 2 for ln in sample):
        return {"format": "users-dat", "sep": None, "header": False, "why": "count id id ... lines"}
    sep = _separator(sample[min(1, len(sample) - 1)])
    fields = [[t.strip() for t in (ln.split(sep) if sep else ln.split())] for ln in sample]
    header = len(fields) > 1 and not _is_number(fields[0][0]) and _is_number(fields[1][0])
    if header:
        names = [f.lower() for f in fields[0]]
        rating = next((k for k, f in enumerate(names) if "rating" in f or f == "score"), None)
        if rating is not None:
            why = f"header column {fields[0][rating]!r}"
            return {"format": "movielens", "sep": sep, "header": True, "why": why}
        if len(names) >= 3 and _is_time_name(names[2]):
            why = f"header column {fields[0][2]!r} (a time, not a rating)"
            return {"format": "pairs", "sep": sep, "header": True, "why": why}
        fields = fields[1:]
    third = [f[2] for f in fields if len(f) >= 3]
    if fields and len(third) == len(fields) and all(_is_number(t) for t in third):
        if all(0 <= float(t) <= 10 for t in third):
            why = "a third field in [0, 10] on every line (ratings)"
            return {"format": "movielens", "sep": sep, "header": header, "why": why}
    return {"format": "pairs", "sep": sep, "header": header, "why": "user-item pairs"}


def load_movielens(
    path,
    *,
    threshold: float = 4.0,
    min_user_interactions: int = 5,
    sep=None,
    header=None,
    k_core: int | None = None,
) -> Interactions:
    """Load a rating file (user item rating [timestamp], e.g. MovieLens u.data, ratings.dat,
    ratings.csv, a RecBole .inter with a rating column) as implicit feedback: a (user, item) pair
    is an interaction when its rating >= threshold.

    sep, header: the field separator ("::", tab, comma, None for whitespace) and whether the first
    line is a header; None for either reads it from the content (sniff_format), whatever the
    file's name.
    Timestamps: with a header, the first column after the rating whose name is time-like
    ("timestamp", "timestamp:float", "time", "ts"); without one, the 4th field when every line has
    a numeric one. A pair rated on several lines keeps the latest time of its lines >= threshold.
    """
    path = Path(path)
    if sep is None or header is None:
        found = sniff_format(path)
        sep = found["sep"] if sep is None else sep
        header = found["header"] if header is None else header
    lines = _read_lines(path)
    users, items, times, time_lines = [], [], [], []
    tcol, declared = 3, False
    if header and lines:
        names = [t.strip() for t in (lines[0].split(sep) if sep else lines[0].split())]
        tcol, declared = _time_column(names, 3), True
    for lineno, line in progress.lines(lines, path):
        if header and lineno == 1:
            continue
        if not line.strip():
            continue
        toks = line.split(sep) if sep else line.split()
        if len(toks) < 3:
            raise _bad(
                path, lineno, f"expected user, item, rating (and timestamp), got {len(toks)} fields"
            )
        u = _int_token(toks[0].strip(), path, lineno, "user id")
        i = _int_token(toks[1].strip(), path, lineno, "item id")
        try:
            r = float(toks[2])
        except ValueError:
            raise _bad(path, lineno, f"rating {toks[2].strip()!r} is not a number") from None
        if not np.isfinite(r):
            raise _bad(path, lineno, f"rating {toks[2].strip()!r} is not finite")
        if r >= threshold:
            users.append(u)
            items.append(i)
            if tcol is not None:
                times.append(toks[tcol].strip() if len(toks) > tcol else None)
                time_lines.append(lineno)
    if not users:
        raise ValueError(f"{path}: no rating >= {threshold} in the file")
    ts = None if tcol is None else _parse_times(path, times, time_lines, declared)
    return from_pairs(
        np.asarray(users, dtype=np.int64),
        np.asarray(items, dtype=np.int64),
        name=path.name,
        source=str(path),
        min_user_interactions=min_user_interactions,
        timestamps=ts,
        k_core=k_core,
    )


def load_pairs(
    path, *, sep: str | None = None, min_user_interactions: int = 5, k_core: int | None = None
) -> Interactions:
    """Load a generic file of user-item pairs, one per line: "user<sep>item[<sep>anything...]".

    sep: the field separator; None guesses from the file (tab, comma, then whitespace). A first line
    whose fields are not both integers is taken as a header when the rest are integers. Ids may be
    arbitrary strings (they are remapped); blank lines and lines starting with '#' are skipped.
    Timestamps only from a header (so with integer ids) naming a column after the item time-like
    ("timestamp", "timestamp:float" of a RecBole .inter, "time", "ts"): a third column without a
    header could be anything (a count, a weight) and is ignored. A pair on several lines keeps
    its latest time.
    """
    path = Path(path)
    lines = _read_lines(path)
    body = [
        (n, ln)
        for n, ln in enumerate(lines, start=1)
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    if not body:
        raise ValueError(f"{path}: the file has no user-item pairs")
    if sep is None:
        probe = body[min(1, len(body) - 1)][1]
        sep = "\t" if "\t" in probe else ("," if "," in probe else None)
    rows = []
    for _, (lineno, line) in progress.lines(body, path):
        toks = [t.strip() for t in (line.split(sep) if sep else line.split())]
        if len(toks) < 2 or not toks[0] or not toks[1]:
            raise _bad(
                path,
                lineno,
                f"expected at least two fields (user, item) separated by {sep or 'whitespace'!r}",
            )
        rows.append((lineno, toks[0], toks[1], toks))

    def is_int(t):  # an id that fits in int64 (larger ones are kept as strings, like names)
        return t.lstrip("-").isdigit() and -(2**63) <= int(t) < 2**63

    ts = None
    if (
        len(rows) > 1
        and not (is_int(rows[0][1]) and is_int(rows[0][2]))
        and all(is_int(a) and is_int(b) for _, a, b, _ in rows[1:])
    ):
        tcol = _time_column(rows[0][3], 2)
        rows = rows[1:]  # header
        if tcol is not None:
            times = [r[3][tcol] if len(r[3]) > tcol else None for r in rows]
            ts = _parse_times(path, times, [r[0] for r in rows], True)
    users = [a for _, a, _, _ in rows]
    items = [b for _, _, b, _ in rows]
    if all(is_int(t) for t in users) and all(is_int(t) for t in items):
        users = np.asarray([int(t) for t in users], dtype=np.int64)
        items = np.asarray([int(t) for t in items], dtype=np.int64)
    else:
        users, items = np.asarray(users), np.asarray(items)
    return from_pairs(
        users,
        items,
        name=path.name,
        source=str(path),
        min_user_interactions=min_user_interactions,
        timestamps=ts,
        k_core=k_core,
    )


def synthetic(
    n_users: int = 2000,
    n_items: int = 1500,
    *,
    rank: int = 16,
    mean_interactions: float = 25.0,
    popularity_exponent: float = 1.0,
    noise: float = 1.0,
    seed: int = 0,
    min_user_interactions: int = 5,
    k_core: int | None = None,
) -> Interactions:
    """Seeded synthetic implicit feedback with planted low-rank preferences and power-law
    popularity.

    User u draws its number of items n_u ~ 5 + Poisson-lognormal around mean_interactions, then its
    n_u items WITHOUT replacement from p(i | u) proportional to exp(<a_u, b_i> + log pop_i) with
    a_u, b_i ~ N(0, 1/sqrt(rank)) * 2 and pop_i = (rank of item i)^(-popularity_exponent) (Zipf), by
    the Gumbel-top-k trick (noise scales the Gumbel noise). Runs in seconds at the default size.
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 2.0 / np.sqrt(np.sqrt(rank)), size=(n_users, rank))
    b = rng.normal(0.0, 2.0 / np.sqrt(np.sqrt(rank)), size=(n_items, rank))
    log_pop = -popularity_exponent * np.log(np.arange(1, n_items + 1))[rng.permutation(n_items)]
    sizes = 5 + rng.poisson(
        np.maximum(mean_interactions - 5, 0.0) * rng.lognormal(0.0, 0.5, n_users) / np.exp(0.125)
    )
    sizes = np.minimum(sizes, n_items // 2)
    users, items = [], []
    for u0 in range(0, n_users, 512):
        u1 = min(n_users, u0 + 512)
        logits = a[u0:u1] @ b.T + log_pop
        logits += noise * rng.gumbel(size=logits.shape)
        order = np.argsort(-logits, axis=1, kind="stable")
        for r in range(u1 - u0):
            n = sizes[u0 + r]
            users.append(np.full(n, u0 + r, dtype=np.int64))
            items.append(order[r, :n].astype(np.int64))
    src = (
        f"synthetic(n_users={n_users}, n_items={n_items}, rank={rank}, "
        f"mean_interactions={mean_interactions}, "
        f"popularity_exponent={popularity_exponent}, noise={noise}, seed={seed})"
    )
    return from_pairs(
        np.concatenate(users),
        np.concatenate(items),
        name="synthetic",
        source=src,
        min_user_interactions=min_user_interactions,
        k_core=k_core,
    )


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def citeulike_path(path=None, *, download: bool = True) -> Path:
    """Locate CiteULike-t users.dat: `path` (a file or a folder holding users.dat), else
    $KDFAST_DATA (a file, a folder with users.dat, or a folder with citeulike-t/users.dat), else the
    cache ($KDFAST_CACHE or ~/.cache/kdfast) where it is downloaded from its public source and
    checked against its sha256. Raises FileNotFoundError saying where it looked."""
    tried = []
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get("KDFAST_DATA"):
        candidates.append(Path(os.environ["KDFAST_DATA"]))
        candidates.append(Path(os.environ["KDFAST_DATA"]) / "citeulike-t")
    for c in candidates:
        for f in (c, c / "users.dat"):
            tried.append(str(f))
            if f.is_file():
                return f
    if path is not None:
        raise FileNotFoundError(
            f"CiteULike-t users.dat not found at {path!r} (tried {', '.join(tried)})"
        )
    cache = Path(os.environ.get("KDFAST_CACHE", Path.home() / ".cache" / "kdfast")) / "citeulike-t"
    target = cache / "users.dat"
    if target.is_file() and _sha256(target) == CITEULIKE_SHA256:
        return target
    tried.append(str(target))
    if not download:
        raise FileNotFoundError(
            f"CiteULike-t users.dat not found (tried {', '.join(tried)}); set KDFAST_DATA"
        )
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
    os.close(fd)
    try:
        try:
            urllib.request.urlretrieve(CITEULIKE_URL, tmp)
        except OSError as exc:
            raise FileNotFoundError(
                f"CiteULike-t users.dat not found (tried {', '.join(tried)}) and the download from "
                f"{CITEULIKE_URL} failed ({exc}); set KDFAST_DATA to a folder holding users.dat"
            ) from None
        got = _sha256(tmp)
        if got != CITEULIKE_SHA256:
            raise ValueError(
                f"downloaded {CITEULIKE_URL} has sha256 {got}, expected {CITEULIKE_SHA256}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def load_citeulike(
    path=None, *, min_user_interactions: int = 5, download: bool = True, k_core: int | None = None
) -> Interactions:
    """CiteULike-t (users with >= 5 interactions: 5,219 users, 25,181 items) - see
    citeulike_path."""
    return load_users_dat(
        citeulike_path(path, download=download),
        name="citeulike-t",
        min_user_interactions=min_user_interactions,
        k_core=k_core,
    )


def load(
    spec: str,
    *,
    fmt: str = "auto",
    min_user_interactions: int = 5,
    threshold: float = 4.0,
    seed: int = 0,
    k_core: int | None = None,
    **synthetic_options,
) -> Interactions:
    """Load a data set by name or path: "synthetic", "citeulike-t" or a file/folder.

    fmt: "auto" (from the file's content, whatever its name: see sniff_format), or "users-dat",
    "movielens" (ratings, kept when >= threshold), "pairs".
    min_user_interactions: users with fewer distinct items are dropped, in one pass (not an
    iterated k-core: items are not filtered, so items with a single user remain).
    k_core: None (default, off) or k >= 1: after that, users with fewer than k items and items
    with fewer than k users are dropped repeatedly until every remaining user and item has >= k
    interactions (the k-core; a ValueError when nothing is left).
    The result has timestamps when the file has them (see the module docstring).
    """
    formats = ("auto", "users-dat", "movielens", "pairs")
    if fmt not in formats:
        raise ValueError(f"fmt must be one of {formats}, got {fmt!r}")
    _check_k_core(k_core)
    if spec == "synthetic":
        return synthetic(
            seed=seed,
            min_user_interactions=min_user_interactions,
            k_core=k_core,
            **synthetic_options,
        )
    if spec == "citeulike-t":
        return load_citeulike(min_user_interactions=min_user_interactions, k_core=k_core)
    p = Path(spec)
    if p.is_dir():
        p = p / "users.dat"
    if not p.is_file():
        raise FileNotFoundError(
            f"data {spec!r} is neither 'synthetic', 'citeulike-t' nor an existing file"
        )
    found = {}
    if fmt == "auto":
        found = sniff_format(p)
        fmt = found["format"]
    if fmt == "users-dat":
        return load_users_dat(
            p,
            name=p.parent.name if p.name == "users.dat" and p.parent.name else p.name,
            min_user_interactions=min_user_interactions,
            k_core=k_core,
        )
    if fmt == "movielens":
        return load_movielens(
            p,
            threshold=threshold,
            min_user_interactions=min_user_interactions,
            sep=found.get("sep"),
            header=found.get("header"),
            k_core=k_core,
        )
    return load_pairs(p, min_user_interactions=min_user_interactions, k_core=k_core)
