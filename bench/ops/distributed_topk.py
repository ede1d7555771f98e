"""kdfast.distributed.topk_scores on one GPU: a world-size-1 process group (NCCL when CUDA is
available, gloo otherwise; a file:// rendezvous in a temporary directory), so that both layouts run
their real collectives (all_gather, all_to_all) through the backend, checked against
kdfast.topk_scores on the same device, and timed against it (the collectives' overhead at world 1).

For bench/gpu.py: checks(device, smoke) and timings(device, smoke) in its row format; no
benchmark cases for bench/run.py (BENCHES is empty). Run alone with
`PYTHONPATH=. python bench/gpu.py --modules distributed_topk` (add `--smoke` without a GPU).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch

import kdfast
import kdfast.distributed as kd
from bench.harness import one_line, peak_memory, time_ms

OP = "distributed_topk"
BENCHES = []  # bench/run.py and bench/test_kernels.py have nothing to run here
CHECK = (2000, 50000, 64, 100)  # n_q, n_k, d, k
SMOKE = (37, 300, 16, 10)
TIMING = (8192, 1_000_000, 64, 100)
SMOKE_TIMING = (64, 2000, 16, 10)


@contextlib.contextmanager
def one_rank_group(device):
    """A 1-rank default process group for the block (reused if one is already initialised)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.get_backend()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        kd.init(backend, init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1,
                timeout_s=120)  # fmt: skip
        try:
            yield backend
        finally:
            dist.destroy_process_group()


def _inputs(shape, device, gen):
    n_q, n_k, d, k = shape
    q = torch.randn(n_q, d, generator=gen).to(device)
    keys = torch.randn(n_k, d, generator=gen).to(device)
    keys[torch.randint(0, n_k, (max(1, n_k // 2000),), generator=gen)] = float("nan")
    keys[1:4] = keys[7]  # ties
    counts = torch.randint(0, 8, (n_q,), generator=gen)
    indptr = torch.zeros(n_q + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = torch.randint(0, n_k, (int(indptr[-1]),), generator=gen)
    return q, keys, (indptr.to(device), indices.to(device)), k


def checks(device, smoke):
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    shape = SMOKE if smoke else CHECK
    rows = []
    with one_rank_group(device) as backend:
        q, keys, ex, k = _inputs(shape, device, gen)
        want = kdfast.topk_scores(q, keys, k, exclude=ex)
        perm = torch.randperm(keys.shape[0], generator=gen).to(device)
        few = keys[: k // 2]  # k > n_k: empty slots
        cases = [
            ("queries layout", dict(layout="queries"), keys, ex, want),
            ("keys layout, all_to_all", dict(layout="keys", merge="all_to_all"), keys, ex, want),
            ("keys layout, all_gather", dict(layout="keys", merge="all_gather"), keys, ex, want),
            ("keys layout, key_ids", dict(layout="keys", key_ids=perm), keys[perm], ex, want),
            ("k > n_k", dict(layout="keys"), few, None, kdfast.topk_scores(q, few, k)),
        ]
        for name, kw, kk, x, ref in cases:
            try:
                got = kd.topk_scores(q, kk, k, exclude=x, **kw)
                same_i = torch.equal(got.indices, ref[1])
                same_v = torch.equal(got.values, ref[0])
                ok = same_i and same_v and got.indices.device == device
                detail = (
                    f"{backend}, world 1, {tuple(q.shape)} x {tuple(kk.shape)}, k={k}: indices "
                    f"{'equal' if same_i else 'DIFFER'}, values {'equal' if same_v else 'DIFFER'}"
                )
            except Exception as exc:  # noqa: BLE001 - a failed row, not a crash of the module
                ok, detail = False, one_line(exc)
            rows.append({"op": OP, "case": name, "ok": ok, "detail": detail})
    return rows


def timings(device, smoke):
    device = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    shape = SMOKE_TIMING if smoke else TIMING
    with one_rank_group(device) as backend:
        q, keys, ex, k = _inputs(shape, device, gen)
        label = f"{shape[0]}x{shape[1]}x{shape[2]} k={k}"
        impls = [
            ("kdfast.topk_scores", lambda: kdfast.topk_scores(q, keys, k, exclude=ex)),
            (
                f"distributed queries ({backend}, world 1)",
                lambda: kd.topk_scores(q, keys, k, exclude=ex, layout="queries"),
            ),
            (
                f"distributed keys ({backend}, world 1)",
                lambda: kd.topk_scores(q, keys, k, exclude=ex, layout="keys"),
            ),
        ]
        for impl, fn in impls:
            try:
                with peak_memory(device) as mem:
                    ms = time_ms(fn, device, warmup=2, reps=10, max_seconds=20.0)
                note = ""
            except Exception as exc:  # noqa: BLE001
                ms, note = None, one_line(exc)
                mem = {"peak_MB": None}
            yield {"op": OP, "case": "large", "shape": label, "impl": impl, "ms": ms,
                   "peak_MB": mem["peak_MB"], "note": note}  # fmt: skip
