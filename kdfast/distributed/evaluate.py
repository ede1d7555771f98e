"""kdfast.distributed.evaluate: kdfast.metrics.evaluate's full-ranking metrics with the evaluated
users split among the ranks (and, for layout="keys", the catalog too)."""

from __future__ import annotations

import math

import torch

from .._core import checks
from .._core.csr import select_rows
from ..metrics import FULL_KS, _full_part, full_metrics
from ._comm import Comm
from .topk import LAYOUTS, block_range, topk_scores

WHERE = "kdfast.distributed.evaluate"


def evaluate(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    split,
    part: str = "valid",
    *,
    ks=FULL_KS,
    layout: str = "queries",
    item_offset: int | None = None,
    item_ids: torch.Tensor | None = None,
    valid_excludes_test: bool = False,
    batch: int = 1024,
    backend: str = "auto",
    merge: str = "auto",
    group=None,
) -> dict:
    """Recall/NDCG/Precision@K of kdfast.metrics.evaluate (protocol "full") on a Split's "valid" or
    "test" part, computed by all ranks of the group together; every rank makes the call and gets
    the same dict.

    The users with ground truth in the part are split into contiguous blocks, one per rank
    (block_range); each rank ranks its block, batch users per call of
    kdfast.distributed.topk_scores, and the per-rank metric sums are added up (all_reduce).

    user_emb: [n_users, d], the table of all users (only this rank's users' rows are read; a
        memory-mapped or CPU table is fine, rows move to item_emb's device per batch).
    item_emb: layout="queries": all items [n_items, d]; layout="keys": this rank's items, with
        item_offset (its first global item id; default: the ranks' slices in rank order) or
        item_ids (int64 global ids).
    split, part, ks, valid_excludes_test, backend: as in kdfast.metrics.evaluate.

    Returns the same numbers as the one-process kdfast.metrics.evaluate, up to the order of the
    float64 sums over users (a relative difference of about 1e-15): the rankings are the same.
    """
    comm = Comm(group, item_emb.device, WHERE)
    err = None
    try:
        if getattr(split, "protocol", None) != "full":
            raise ValueError(
                "split: kdfast.distributed.evaluate computes the full-ranking protocol, got "
                f"protocol {getattr(split, 'protocol', None)!r}"
            )
        if part not in ("valid", "test"):
            raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
        checks.one_of(layout, "layout", LAYOUTS)
        batch = checks.positive_int(batch, "batch")
        checks.floating(user_emb, "user_emb", ndim=2)
        checks.floating(item_emb, "item_emb", ndim=2)
        if user_emb.shape[0] != split.n_users:
            raise ValueError(
                f"user_emb must have one row per user of the split ({split.n_users}), got shape "
                f"{tuple(user_emb.shape)}"
            )
        if layout == "queries" and item_emb.shape[0] != split.n_items:
            raise ValueError(
                f'item_emb must have one row per item ({split.n_items}) with layout="queries", '
                f"got shape {tuple(item_emb.shape)}"
            )
    except (ValueError, TypeError) as exc:
        err = exc
    comm.agree(err)
    ks = tuple(ks)
    truth_all, users, exclude = _full_part(split, part, valid_excludes_test)
    n_users = users.numel()
    u0, u1 = block_range(n_users, comm.rank, comm.world)
    mine = users[u0:u1]
    longest = max(
        b - a for a, b in (block_range(n_users, r, comm.world) for r in range(comm.world))
    )
    kmax = max(ks)
    dev = item_emb.device
    top = torch.empty((mine.numel(), kmax), dtype=torch.int64)
    kw = {"key_offset": item_offset, "key_ids": item_ids} if layout == "keys" else {}
    with torch.no_grad():
        ie = item_emb.detach()
        for b in range(math.ceil(longest / batch)):  # the same number of calls on every rank
            ub = mine[b * batch : (b + 1) * batch]
            q = user_emb.detach()[ub.to(user_emb.device)].to(dev)
            ex = select_rows(*exclude, ub)
            _, idx = topk_scores(
                q, ie, kmax, exclude=ex, layout=layout, backend=backend, merge=merge,
                group=group, **kw,
            )  # fmt: skip
            top[b * batch : b * batch + ub.numel()] = idx.cpu()
    names = [f"{m}@{k}" for k in ks for m in ("Recall", "NDCG", "Precision")]
    sums = torch.zeros(len(names), dtype=torch.float64)
    if mine.numel():
        means = full_metrics(top, select_rows(*truth_all, mine), split.n_items, ks)
        sums = torch.tensor([means[n] * mine.numel() for n in names], dtype=torch.float64)
    total = comm.all_reduce_sum(sums.to(comm.device)).cpu()
    return {n: float(total[j] / max(n_users, 1)) for j, n in enumerate(names)}
