"""kdfast.distributed.topk_scores: kdfast.topk_scores over a torch.distributed process group.

Both layouts shard the queries: each rank passes the queries it owns (a contiguous block of the
global query rows, in rank order; a block may be empty) and gets their top-k back.

layout="queries": every rank holds all keys. Each rank runs the fused op on its own queries; the
    only collectives are two small status/shape exchanges.
layout="keys": each rank holds a slice of the keys (the catalog): key_offset (its first global id;
    by default the ranks' slices follow each other in rank order) or key_ids (explicit global ids).
    1. all_gather of the queries (n_q x d x itemsize bytes to every rank);
    2. the exclusions, given in global key ids, go to the rank holding each id (all_to_all);
    3. every rank ranks all queries against its slice with the fused op: a partial top-k;
    4. all_to_all sends each query's partial list to the rank that owns the query, as one int64
       rank key per entry (the float32 score's order bits and the global id, 8 bytes instead of
       4 + 8): each rank sends n_q * k * 8 * (world - 1) / world bytes, each byte moves once;
       all_gather would deliver every partial list to every rank, world times more bytes;
    5. the owner keeps the k largest rank keys of its world * k candidates.
    The rank keys order by score, then by lower global id, with not finite scores as -inf: the order
    of the one-process op, so the result is the one-process result (same ids, same values) whenever
    the shard's kernel computes the same float32 score for a (query, key) pair as the one-process
    call (the kernels compute each score from that pair's d products alone; the tests check it).

Errors: argument checks run on every rank, then one status exchange makes every rank raise the same
error (naming the rank it came from), so no rank waits for another that failed. A rank that dies
or never calls makes the others raise DistributedError after the process group's timeout.
"""

from __future__ import annotations

import torch

from .._core import checks
from .._core.csr import as_csr, from_entries, row_ids, validate_csr
from .._core.numerics import EMPTY, decode_rank_keys, encode_rank_keys
from ..ops.topk import SCORES
from ..ops.topk import topk_scores as _local_topk
from ._comm import Comm

LAYOUTS = ("queries", "keys")
MERGES = ("auto", "all_to_all", "all_gather")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WHERE = "kdfast.distributed.topk_scores"


class Ranking(tuple):
    """(values, indices) of this rank's queries, as kdfast.topk_scores returns them, with where they
    sit in the global ranking: rows row_start .. row_start + len(values) of n_rows."""

    def __new__(cls, values, indices, row_start, n_rows):
        self = super().__new__(cls, (values, indices))
        self.row_start, self.n_rows = int(row_start), int(n_rows)
        return self

    def __getnewargs__(self):  # pickling keeps row_start and n_rows
        return (self[0], self[1], self.row_start, self.n_rows)

    values = property(lambda self: self[0])
    indices = property(lambda self: self[1])

    @property
    def rows(self) -> range:
        return range(self.row_start, self.row_start + self[0].shape[0])


def block_range(n: int, rank: int, world: int) -> tuple:
    """The rows [start, stop) of rank's contiguous block when n rows are split among world ranks
    (the first n % world ranks get one row more)."""
    return n * rank // world, n * (rank + 1) // world


def slice_rows(csr, start: int, stop: int):
    """Rows start..stop of a CSR pair (indptr, indices), as a CSR pair: the exclusions of the
    queries a rank owns, e.g. slice_rows(train, *block_range(n_users, rank, world))."""
    indptr, indices = (torch.as_tensor(a) for a in csr)
    lo, hi = int(indptr[start]), int(indptr[stop])
    return indptr[start : stop + 1] - lo, indices[lo:hi]


def _local_checks(queries, keys, k, layout, score, key_bias, key_offset, key_ids, merge):
    checks.floating(queries, "queries", ndim=2)
    checks.floating(keys, "keys", ndim=2)
    checks.same_device(queries=queries, keys=keys)
    checks.same_dim(queries, "queries", keys, "keys")
    checks.same_dtype(queries, "queries", keys, "keys")
    k = checks.positive_int(k, "k")
    layout = checks.one_of(layout, "layout", LAYOUTS)
    score = checks.one_of(score, "score", SCORES)
    merge = checks.one_of(merge, "merge", MERGES)
    if key_bias is not None:
        checks.floating(key_bias, "key_bias", ndim=1)
        if key_bias.shape[0] != keys.shape[0]:
            raise ValueError(
                f"key_bias must have one value per key of this rank ({keys.shape[0]}), got shape "
                f"{tuple(key_bias.shape)}"
            )
    if layout == "queries" and (key_offset is not None or key_ids is not None):
        raise ValueError(
            'key_offset and key_ids belong to layout="keys" (with layout="queries" every rank '
            "holds all keys)"
        )
    if key_offset is not None and key_ids is not None:
        raise ValueError("give key_offset or key_ids, not both")
    if key_offset is not None:
        key_offset = checks.nonneg_int(key_offset, "key_offset")
    if key_ids is not None:
        checks.integer(key_ids, "key_ids", ndim=1)
        if key_ids.shape[0] != keys.shape[0]:
            raise ValueError(
                f"key_ids must have one global id per key of this rank ({keys.shape[0]}), got "
                f"shape {tuple(key_ids.shape)}"
            )
        key_ids = key_ids.to(device=keys.device, dtype=torch.int64)
        if key_ids.numel() and int(key_ids.min()) < 0:
            raise ValueError("key_ids must be >= 0")
        if key_ids.numel() > 1 and torch.unique(key_ids).numel() != key_ids.numel():
            raise ValueError("key_ids must not repeat an id")
    return k, layout, score, merge, key_offset, key_ids


def _meta(queries, keys, k, layout, score, key_bias, key_offset, key_ids, merge):
    """This rank's shapes and options, as int64, for the cross-rank checks."""
    if key_ids is not None:
        mode, lo = 2, int(key_ids.min()) if key_ids.numel() else 0
        hi = int(key_ids.max()) + 1 if key_ids.numel() else 0
    elif key_offset is not None:
        mode, lo, hi = 1, key_offset, key_offset + keys.shape[0]
    else:
        mode, lo, hi = 0, 0, 0
    return torch.tensor(
        [
            queries.shape[0],
            queries.shape[1],
            keys.shape[0],
            k,
            _DTYPES.index(queries.dtype),
            SCORES.index(score),
            key_bias is not None,
            LAYOUTS.index(layout),
            mode,
            lo,
            hi,
            MERGES.index(merge),
        ],
        dtype=torch.int64,
    )


_AGREE = (
    (1, "queries", "d (columns of queries and keys)"),
    (3, "k", "k"),
    (4, "queries", "dtype"),
    (5, "score", "score"),
    (6, "key_bias", "whether key_bias is given"),
    (7, "layout", "layout"),
    (11, "merge", "merge"),
)


def _cross_checks(meta, layout):
    """Raise (on every rank alike: all see the same table) where the ranks disagree; returns the
    global id range [lo, hi) of each rank's keys (keys layout) and the catalog size."""
    world = meta.shape[0]
    names = {4: [str(t).replace("torch.", "") for t in _DTYPES], 5: SCORES, 7: LAYOUTS, 11: MERGES}
    for col, arg, what in _AGREE:
        vals = meta[:, col].tolist()
        if len(set(vals)) > 1:
            shown = [names[col][v] if col in names else v for v in vals]
            raise ValueError(
                f"{arg}: the ranks disagree on {what}: {shown} on ranks 0..{world - 1}"
            )
    if layout == "queries":
        n_k = meta[:, 2].tolist()
        if len(set(n_k)) > 1:
            raise ValueError(
                f'keys: with layout="queries" every rank must hold all keys, but the ranks hold '
                f"{n_k} rows"
            )
        return None, n_k[0]
    modes = set(meta[:, 8].tolist())
    if len(modes) > 1:
        given = ["neither", "key_offset", "key_ids"]
        shown = [given[m] for m in meta[:, 8].tolist()]
        raise ValueError(
            f"key_offset/key_ids: every rank must give the same one (or none): {shown}"
        )
    n_k = meta[:, 2]
    if modes == {0}:
        hi = torch.cumsum(n_k, 0)
        lo = hi - n_k
    else:
        lo, hi = meta[:, 9].clone(), meta[:, 10].clone()
    if modes <= {0, 1}:
        nonempty = torch.nonzero(n_k > 0).flatten()
        order = nonempty[torch.argsort(lo[nonempty])]
        for a, b in zip(order[:-1].tolist(), order[1:].tolist()):
            if hi[a] > lo[b]:
                raise ValueError(
                    f"key_offset: the key ranges of ranks {a} [{int(lo[a])}, {int(hi[a])}) and {b} "
                    f"[{int(lo[b])}, {int(hi[b])}) overlap"
                )
    n_total = int(hi.max()) if world else 0
    return (lo, hi, 2 in modes), n_total


def topk_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    exclude=None,
    layout: str = "queries",
    key_offset: int | None = None,
    key_ids: torch.Tensor | None = None,
    score: str = "dot",
    key_bias: torch.Tensor | None = None,
    backend: str = "auto",
    merge: str = "auto",
    group=None,
) -> Ranking:
    """kdfast.topk_scores with the queries (and, for layout="keys", the keys) split among the ranks
    of a torch.distributed process group; every rank of the group must make the same call.

    Args:
        queries: [n_q, d] the queries this rank owns (global rows row_start ..; the ranks' blocks
            follow each other in rank order; n_q may be 0 on some ranks).
        keys: layout="queries": all keys [n_k, d] (the same on every rank); layout="keys": this
            rank's slice of the catalog [n_local, d] (may be empty; n_local may be < k).
        k: keys per query (the same on every rank).
        exclude: keys each of this rank's queries must never get, in global key ids, as CSR with n_q
            rows (anything kdfast.topk_scores accepts).
        layout: "queries" or "keys" (see the module docstring for what each moves).
        key_offset: layout="keys": the global id of this rank's first key (its keys are ids
            key_offset .. key_offset + n_local - 1). Default: the ranks' slices follow each other
            in rank order (rank 0 holds ids 0 .., rank 1 the next ones, ...).
        key_ids: layout="keys", instead of key_offset: int64 [n_local] the global id of each key
            (unique across ranks; any order).
        score, key_bias, backend: as in kdfast.topk_scores (key_bias: this rank's keys' biases).
        merge: "auto" (all_to_all where the backend has it, else all_gather), "all_to_all" or
            "all_gather": how the keys layout delivers the partial lists.
        group: the process group (default: the default group).

    Returns:
        Ranking: (values [n_q, k] float32, indices [n_q, k] int64 global key ids) of this rank's
        queries, equal to kdfast.topk_scores on all queries and keys in one process (same order,
        ties to the lower global id, -1 / -inf for empty slots, not finite scores as -inf), with
        .row_start and .n_rows (the global query rows). For score="neg_sqeuclidean" each shard
        selects by the fused op's float32 surrogate, so keys within its rounding error of the k-th
        may differ from the one-process choice (see kdfast.topk_scores). float64 inputs are merged
        by their float32 values.

    Raises ValueError/TypeError naming the argument (on every rank, with the rank it came from) for
    bad arguments or ranks that disagree (k, d, dtype, layout, ...); RuntimeError when no process
    group is initialised; kdfast.distributed.DistributedError when another rank failed, or a
    collective did not complete within the process group's timeout.
    """
    device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
    comm = Comm(group, device, WHERE)
    # every local step is followed by a status exchange (comm.step): a rank that raises makes every
    # rank raise the same error, and no rank is left in a collective the others never reach
    opts = comm.step(
        lambda: _local_checks(queries, keys, k, layout, score, key_bias, key_offset, key_ids, merge)
    )
    k, layout, score, merge, key_offset, key_ids = opts
    meta = comm.all_gather(
        _meta(queries, keys, k, layout, score, key_bias, key_offset, key_ids, merge)
    ).cpu()
    ranges, n_total = _cross_checks(meta, layout)  # the same table on every rank: raises alike
    n_q_all = meta[:, 0]
    q_start = int(n_q_all[: comm.rank].sum())
    n_rows = int(n_q_all.sum())
    if layout == "queries":
        out = comm.step(
            lambda: _local_topk(
                queries, keys, k, exclude=exclude, score=score, key_bias=key_bias,
                backend=backend,
            )
        )  # fmt: skip
        return Ranking(*out, q_start, n_rows)
    return _keys_layout(
        comm, queries, keys, k, exclude, score, key_bias, key_ids, backend, merge, meta, ranges,
        n_total, q_start, n_rows,
    )  # fmt: skip


def _query_bytes(queries, n_q_all, device):
    """This rank's queries as bytes [longest, d * itemsize], zero rows after its own."""
    longest = int(n_q_all.max())
    width = queries.shape[1] * queries.element_size()
    raw = queries.contiguous().view(torch.uint8).reshape(queries.shape[0], width)
    pad = torch.zeros((longest, width), dtype=torch.uint8, device=device)
    pad[: queries.shape[0]] = raw.to(device)
    return pad


def _all_queries(got, n_q_all, queries):
    """All ranks' queries [sum n_q, d] in rank order, from the gathered bytes."""
    rows = [got[r, : int(n_q_all[r])] for r in range(got.shape[0])]
    allq = torch.cat(rows).to(queries.device)
    return allq.view(queries.dtype).reshape(-1, queries.shape[1])


def _exclusion_chunks(exclude, queries, n_total, q_start, ranges, n_k_all, world):
    """This rank's exclusions as (global query row, global key id) pairs, one chunk per rank: the
    rank holding the id (with explicit key_ids: every rank)."""
    lo, hi, by_ids = ranges
    ip, ix = as_csr(exclude, "exclude", queries.shape[0], max(n_total, 1), optional=True)
    validate_csr(ip, ix, "exclude", n_total)
    entries = torch.stack([row_ids(ip) + q_start, ix], 1).cpu()
    if by_ids:
        return [entries] * world
    owner = _owner_of(entries[:, 1], lo, hi, n_k_all)
    return [entries[owner == r] for r in range(world)]


def _merge(got, k, dev):
    """The k largest rank keys of each row among every rank's partial list, decoded."""
    cand = torch.cat([g.to(dev) for g in got], 1)
    top = torch.topk(cand, k, dim=1, sorted=True).values if cand.shape[0] else cand[:, :k]
    values, index = decode_rank_keys(top)
    return values.to(torch.float32), index


def _keys_layout(
    comm, queries, keys, k, exclude, score, key_bias, key_ids, backend, merge, meta, ranges,
    n_total, q_start, n_rows,
):  # fmt: skip
    dev = queries.device
    n_q_all = meta[:, 0]
    chunks, qbytes = comm.step(
        lambda: (
            _exclusion_chunks(exclude, queries, n_total, q_start, ranges, meta[:, 2], comm.world),
            _query_bytes(queries, n_q_all, comm.device),
        )
    )
    mine = comm.exchange(chunks, merge)
    got_q = comm.all_gather(qbytes)
    lo = ranges[0][comm.rank]

    def partial_lists():  # every query's top-k among this rank's keys, one chunk per owner
        all_q = _all_queries(got_q, n_q_all, queries)
        entries = torch.cat(mine).cpu()
        part = _partial(all_q, keys, k, entries, score, key_bias, key_ids, lo, backend, n_rows)
        bounds = torch.cumsum(n_q_all, 0).tolist()
        return [part[s:e] for s, e in zip([0] + bounds[:-1], bounds)]

    got = comm.exchange(comm.step(partial_lists), merge)  # [n_q, k] from every rank
    values, index = comm.step(lambda: _merge(got, k, dev))
    return Ranking(values, index, q_start, n_rows)


def _owner_of(ids, lo, hi, n_k):
    """The rank whose [lo, hi) holds each id (ranges disjoint; empty ranks hold nothing)."""
    owner = torch.full_like(ids, -1)
    for r in range(lo.shape[0]):
        if int(n_k[r]) > 0:
            owner[(ids >= lo[r]) & (ids < hi[r])] = r
    return owner


def _partial(all_q, keys, k, entries, score, key_bias, key_ids, lo, backend, n_rows):
    """Rank keys [n_rows, k] (int64) of every query's top-k among this rank's keys, global ids."""
    dev = all_q.device
    n_local = keys.shape[0]
    if n_rows == 0:
        return torch.empty((0, k), dtype=torch.int64, device=dev)
    if n_local == 0:
        return torch.full((n_rows, k), EMPTY, dtype=torch.int64, device=dev)
    rows, ids = entries[:, 0], entries[:, 1]
    if key_ids is not None:
        # local order = global id order, so that the fused op's tie rule (lower local index) is the
        # global one
        sorted_ids, perm = torch.sort(key_ids)
        keys = keys[perm]
        key_bias = None if key_bias is None else key_bias[perm]
        pos = torch.searchsorted(sorted_ids.cpu(), ids.contiguous()).clamp_max(n_local - 1)
        keep = sorted_ids.cpu()[pos] == ids
        rows, local = rows[keep], pos[keep]
        to_global = sorted_ids
    else:
        keep = (ids >= int(lo)) & (ids < int(lo) + n_local)
        rows, local = rows[keep], ids[keep] - int(lo)
        to_global = None
    excl = from_entries(rows, local, n_rows)
    values, index = _local_topk(
        all_q,
        keys,
        k,
        exclude=tuple(t.to(dev) for t in excl),
        score=score,
        key_bias=key_bias,
        backend=backend,
    )
    empty = index < 0
    if to_global is not None:
        glob = to_global.to(dev)[index.clamp_min(0)]
    else:
        glob = index + int(lo)
    return torch.where(empty, EMPTY, encode_rank_keys(values, glob.clamp_min(0)))
