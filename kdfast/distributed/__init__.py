"""kdfast on torch.distributed: the teacher's top-K ranking, its item side and full-ranking
evaluation with queries or the catalog split among processes (NCCL between GPUs, gloo between CPU
processes, started with torchrun; kdfast has no transport of its own). See docs/DISTRIBUTED.md.

    init(backend=None, timeout_s=None, ...)    the default process group, kdfast's timeout (300 s)
    topk_scores(queries, keys, k, layout=...)  kdfast.topk_scores, sharded; the same result
    evaluate(user_emb, item_emb, split, ...)   kdfast.metrics.evaluate's full-ranking numbers
    ShardWriter / load_rankings(path)          rankings written one file per rank, read back as one
    block_range(n, rank, world)                the rows a rank owns
    slice_rows(csr, start, stop)               those rows of an exclusion CSR
"""

from __future__ import annotations

from ._comm import DEFAULT_TIMEOUT_S, DistributedError, init
from .evaluate import evaluate
from .shards import ShardedArray, ShardWriter, load_rankings
from .topk import Ranking, block_range, slice_rows, topk_scores

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedError",
    "Ranking",
    "ShardWriter",
    "ShardedArray",
    "block_range",
    "evaluate",
    "init",
    "load_rankings",
    "slice_rows",
    "topk_scores",
]
