"""Teacher-ranking samplers (RRD, IR-RRD and the methods that sample from a teacher's list).

rank_discounted_sample: K positions WITHOUT replacement from ranks 1..N with p(r) ~ exp(-r / T),
    sorted.
uniform_excluding_sample: L ids per row, uniform over ids not in the row's exclusion lists, without
    replacement within a row, by rejection against sorted per-row lists (no dense rows x ids mask).
Both are vectorised over rows, draw from a torch.Generator and run on the device of their inputs.

backend: "torch" (the tensor code below, any device) or "cpp" (the C++ kernels of csrc/sampling.cpp,
CPU only: one seeded random stream per row, the same result for any thread count); "auto" takes cpp
on the CPU when the extension is built, as the ops do (kdfast._core.backend.resolve, KDFAST_BACKEND
included; KDFAST_BACKEND=triton counts as "auto" here). Both draw their randomness from `generator`
(cpp: one 62-bit seed per call) and follow the same laws, but the two backends give different
samples for the same generator state.
"""

from __future__ import annotations

import math

import torch

from ._core import backend as _backend
from ._core import checks as _checks
from ._core.csr import as_csr, from_counts, has_pair, row_ids

_MAX_ROUNDS = 64


def _draw_device(generator, device):
    """Random numbers are drawn on the generator's device (so a CPU generator works for CUDA
    samples, at the cost of a copy) and moved to `device`."""
    return torch.device(device) if generator is None else torch.device(generator.device)


def _use_cpp(backend, device) -> bool:
    """Whether the C++ sampler runs (RuntimeError saying why when "cpp" is asked for and cannot, or
    for "triton", which the samplers lack)."""
    return _backend.resolve(backend, device, available=("torch", "cpp")) == "cpp"


def _seed(generator) -> int:
    """One 62-bit seed for the C++ samplers, drawn from the generator (or the global RNG)."""
    dev = "cpu" if generator is None else generator.device
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))


def rank_discounted_sample(
    n_rows: int, n: int, k: int, temperature: float, *, generator=None, device="cpu", backend="auto"
):
    """K distinct 0-based positions per row from 0..n-1 with p(r) ~ exp(-(r+1) / T), sorted
    ascending.

    Args:
        n_rows: number of rows (users) to sample for (>= 0).
        n: length of each ranked list (ranks 1..N are positions 0..N-1), N >= K.
        k: how many positions per row (>= 1).
        temperature: T > 0.
        generator: torch.Generator (or None for the global one); numbers are drawn on its device.
        backend: "auto", "torch" or "cpp" (see the module docstring).
    Returns int64 [n_rows, k], each row strictly increasing.
    Method: Gumbel-top-k: the top-k of log p(r) + Gumbel noise is a sample of k items without
    replacement from the successive-draw (Plackett-Luce) process with weights p(r), the RRD sampler
    (cpp: the same law as an exponential race, with exact skips over the positions that cannot
    enter).
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        raise ValueError(f"n_rows must be an int >= 0, got {n_rows!r}")
    n = _checks.positive_int(n, "n")
    k = _checks.positive_int(k, "k")
    if n < k:
        raise ValueError(f"n (the length of the ranked list, {n}) must be >= k ({k})")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
        or not math.isfinite(temperature)
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if _use_cpp(backend, device):
        out = torch.empty((n_rows, k), dtype=torch.int64)
        if n_rows:
            _backend.ext().rank_discounted_sample(
                _seed(generator),
                n_rows,
                n,
                k,
                float(temperature),
                out.data_ptr(),
                _backend.num_threads(),
            )
        return out
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    u = torch.rand(
        (n_rows, n),
        generator=generator,
        dtype=torch.float64,
        device=_draw_device(generator, device),
    ).to(device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    # keys -r/T + g, or T times them (the same order) where 1/T could overflow: T -> 0 gives the
    # first k positions, the limit of the law, as the C++ sampler does
    t = float(temperature)
    keys = -ranks / t + gumbel if t >= 1.0 else -ranks + t * gumbel
    pos = torch.topk(keys, k, dim=1).indices
    return torch.sort(pos, dim=1).values


def exclusion_keys(n_rows, n_ids, exclude=None, extra=None, device="cpu"):
    """Sorted unique int64 keys row * n_ids + id of every excluded (row, id), and per-row counts.

    Building them sorts every excluded pair; a caller that samples every epoch against the same
    exclusions builds them once and passes them to uniform_excluding_sample(excluded_keys=...).
    """
    device = torch.device(device)
    rows, ids = [], []
    if exclude is not None:
        indptr, indices = as_csr(exclude, "exclude", n_rows, n_ids, device=device, validate=True)
        rows.append(row_ids(indptr))
        ids.append(indices)
    if extra is not None:
        _checks.integer(extra, "extra", ndim=2)
        if extra.shape[0] != n_rows:
            raise ValueError(f"extra must have {n_rows} rows, got shape {tuple(extra.shape)}")
        _checks.index_range(extra, "extra", n_ids, allow_pad=True)
        extra = extra.to(device=device, dtype=torch.int64)
        valid = extra >= 0
        rows.append(torch.arange(n_rows, device=device)[:, None].expand_as(extra)[valid])
        ids.append(extra[valid])
    if not rows:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(
            n_rows, dtype=torch.int64, device=device
        )
    keys = torch.unique(torch.cat(rows) * n_ids + torch.cat(ids))
    counts = torch.bincount(torch.div(keys, n_ids, rounding_mode="floor"), minlength=n_rows)
    return keys, counts


_KEYS_FORMAT = (
    "keys must be row * n_ids + id, sorted, unique, with per-row counts, as exclusion_keys returns"
)


def _checked_keys(excluded_keys, n_rows, n_ids):
    """A caller-built (keys, counts) pair, checked as both backends need it (O(number of keys)):
    ValueError naming what is wrong, instead of samples that silently take excluded ids."""
    if not (isinstance(excluded_keys, (tuple, list)) and len(excluded_keys) == 2):
        raise TypeError(
            f"excluded_keys must be a (keys, counts) pair, got {type(excluded_keys).__name__}"
        )
    keys = _checks.integer(excluded_keys[0], "excluded_keys keys", ndim=1).to(torch.int64)
    counts = _checks.integer(excluded_keys[1], "excluded_keys counts", ndim=1).to(torch.int64)
    if counts.numel() != n_rows:
        raise ValueError(
            f"excluded_keys holds counts for {counts.numel()} rows, expected n_rows = {n_rows}"
        )
    if (n_rows and int(counts.min()) < 0) or int(counts.sum()) != keys.numel():
        raise ValueError(
            f"excluded_keys counts must be >= 0 and sum to the {keys.numel()} keys ({_KEYS_FORMAT})"
        )
    if keys.numel() > 1 and bool((keys[1:] <= keys[:-1]).any()):
        raise ValueError(f"excluded_keys are not sorted and unique ({_KEYS_FORMAT})")
    rows = torch.div(keys, n_ids, rounding_mode="floor")
    bad = rows != row_ids(from_counts(counts.to(keys.device)))
    if bool(bad.any()):
        r = int(row_ids(from_counts(counts.to(keys.device)))[bad][0])
        raise ValueError(f"excluded_keys holds keys outside row {r} ({_KEYS_FORMAT})")
    return keys, counts


def _rejected(cand, keys, n_ids):
    """[R, L] bool: the candidate is an excluded id of its row, or repeats an earlier slot of the
    row."""
    r = torch.arange(cand.shape[0], device=cand.device)[:, None]
    bad = has_pair(keys, r * n_ids + cand)
    srt, order = torch.sort(cand, dim=1, stable=True)
    dup_sorted = torch.zeros_like(srt, dtype=torch.bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
    return bad | dup


def uniform_excluding_sample(
    n_rows: int,
    n_ids: int,
    size: int,
    *,
    exclude=None,
    extra=None,
    generator=None,
    device="cpu",
    excluded_keys=None,
    backend="auto",
):
    """`size` distinct ids per row, uniform over [0, n_ids) minus the row's excluded ids.

    Args:
        n_rows: number of rows (users, or items for the item side).
        n_ids: number of ids to draw from (items, or users).
        size: L >= 1, at most the number of available ids of every row.
        exclude: CSR with n_rows rows (e.g. the observed items), or None.
        extra: int64 [n_rows, M] more ids to exclude per row (e.g. the teacher's top-N), -1
            padding; or None.
        generator: torch.Generator (numbers are drawn on its device), or None.
        excluded_keys: the result of exclusion_keys(n_rows, n_ids, exclude, extra) built beforehand,
            in place of exclude/extra (which must then be None).
    Returns int64 [n_rows, size], no id repeated within a row, none excluded; order is random.
    Method: draw every slot uniformly; reject slots whose id is excluded (binary search in the
    sorted (row, id) keys) or repeats an earlier slot of its row; redraw only the rejected slots,
    until none is left. Rows that are still unfinished after a few rounds (nearly exhausted rows)
    are completed exactly from their remaining ids. The result is uniform over the subsets of the
    available ids.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        raise ValueError(f"n_rows must be an int >= 0, got {n_rows!r}")
    n_ids = _checks.positive_int(n_ids, "n_ids")
    size = _checks.positive_int(size, "size")
    device = torch.device(device)
    draw = _draw_device(generator, device)
    if excluded_keys is not None:
        if exclude is not None or extra is not None:
            raise ValueError("pass either excluded_keys or exclude/extra, not both")
        keys, counts = _checked_keys(excluded_keys, n_rows, n_ids)
    else:
        keys, counts = exclusion_keys(n_rows, n_ids, exclude, extra, device)
    avail = n_ids - counts
    if n_rows and int(avail.min()) < size:
        r = int(torch.argmin(avail))
        raise ValueError(
            f"size = {size} is larger than the {int(avail[r])} available ids of row {r} "
            f"({n_ids} ids, {int(counts[r])} excluded)"
        )
    if _use_cpp(backend, device):
        out = torch.empty((n_rows, size), dtype=torch.int64)
        if n_rows:
            offsets = from_counts(counts.cpu())
            keys = keys.contiguous()
            # raises ValueError for a key outside its row
            _backend.ext().uniform_excluding_sample(
                _seed(generator),
                n_rows,
                n_ids,
                size,
                keys.data_ptr(),
                offsets.data_ptr(),
                out.data_ptr(),
                _backend.num_threads(),
            )
        return out
    out = torch.randint(0, n_ids, (n_rows, size), generator=generator, device=draw).to(device)
    bad = _rejected(out, keys, n_ids)
    rounds = 0
    while bool(bad.any()) and rounds < _MAX_ROUNDS:
        redraw = torch.randint(0, n_ids, (int(bad.sum()),), generator=generator, device=draw).to(
            device
        )
        out = out.masked_scatter(bad, redraw)
        bad = _rejected(out, keys, n_ids)
        rounds += 1
    for r in torch.nonzero(bad.any(1)).flatten().tolist():  # rare: rows with few available ids
        lo, hi = torch.searchsorted(
            keys, torch.tensor([r * n_ids, (r + 1) * n_ids], device=device)
        ).tolist()
        taken = torch.zeros(n_ids, dtype=torch.bool, device=device)
        taken[keys[lo:hi] - r * n_ids] = True
        ok = ~bad[r]
        taken[out[r][ok]] = True
        free = torch.nonzero(~taken).flatten()
        pick = free[
            torch.randperm(free.numel(), generator=generator, device=draw).to(device)[
                : int(bad[r].sum())
            ]
        ]
        out[r] = out[r].masked_scatter(bad[r], pick)
    return out
