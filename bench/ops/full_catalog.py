"""kdfast.full_catalog_listwise_loss (and full_catalog_set_loss in the checks): benchmark cases and
providers, and the GPU checks of the Triton backend.

Providers, forward + backward: kdfast on the device's backend (and its forward alone; on the GPU
also with TF32 dots allowed), the eager reference (the op's chunked reference backend,
backend="torch"), the dense formula (the B x I score matrix and a dense exclusion mask built
beforehand, autograd) and torch.compile of the dense formula.

Checks: the Triton backend against the reference backend on the GPU, fresh random inputs with
padding, repeated ids and unsorted exclusion rows with repeats, float32, float64 and bfloat16, with
and without a clamp, loss and both gradients with grad_output != 1; NaN or inf fails.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

import kdfast
from bench.harness import (
    Bench,
    Provider,
    Step,
    check_row,
    gpu_timings,
    poison_cuda_cache,
    tf32,
    value_and_grads,
)
from kdfast.ops.plackett_luce.reference import plackett_luce_loss

OP = "full_catalog"


def inputs(B, n_items, d, K, n_ex, dtype, device, seed, scale=1.0):
    """(user [B, d], item [I, d], ranked ids [B, K] with padding and a repeat, exclusion CSR with
    about n_ex unsorted ids per row, repeats allowed)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = (torch.randn(B, d, generator=g) * scale / math.sqrt(d) ** 0.5).to(
        device=device, dtype=dtype
    )
    v = (torch.randn(n_items, d, generator=g) * scale / math.sqrt(d) ** 0.5).to(
        device=device, dtype=dtype
    )
    ranked = torch.randint(0, n_items, (B, K), generator=g)
    if K > 2:
        ranked[0, -2:] = -1  # padding
        ranked[-1, 1] = ranked[-1, 0]  # a repeat
    counts = torch.randint(0, 2 * n_ex + 1, (B,), generator=g)
    indptr = torch.zeros(B + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = torch.randint(0, n_items, (int(indptr[-1]),), generator=g)  # unsorted, with repeats
    return u, v, ranked.to(device), (indptr.to(device), indices.to(device))


def _per_row(fn, idx, exclude, clamp, backend):
    """(user, item) -> the per-row losses of fn on one backend, NaN left in CUDA's cache first."""

    def loss(user, item):
        poison_cuda_cache(user.device)
        return fn(user, item, idx, exclude=exclude, reduction="none", backend=backend, clamp=clamp)

    return loss


def checks(device, smoke):
    fns = {"listwise": kdfast.full_catalog_listwise_loss, "set": kdfast.full_catalog_set_loss}
    if smoke:
        cases = [
            ("listwise", 4, 150, 8, 5, 3, torch.float32, None),
            ("set", 3, 97, 16, 4, 5, torch.float32, 1.0),
        ]
    else:
        cases = [
            ("listwise", 64, 5003, 64, 50, 50, torch.float32, None),
            ("listwise", 33, 20011, 100, 17, 200, torch.float32, 40.0),
            ("set", 64, 5003, 64, 60, 50, torch.float32, None),
            ("listwise", 16, 3001, 32, 10, 20, torch.float64, None),
            ("listwise", 64, 5003, 64, 50, 50, torch.bfloat16, None),
            ("listwise", 2048, 1 << 20, 64, 50, 100, torch.float32, None),
        ]
    res = []
    for i, (kind, B, n_items, d, K, n_ex, dtype, clamp) in enumerate(cases):
        u, v, idx, ex = inputs(
            B, n_items, d, K, n_ex, dtype, device, seed=10 + i, scale=3.0 if clamp else 1.0
        )
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        go = (torch.rand(B, generator=torch.Generator(device="cpu").manual_seed(1)) + 0.5).to(
            device, acc
        )
        want = value_and_grads(_per_row(fns[kind], idx, ex, clamp, "torch"), (u, v), go)
        got = value_and_grads(_per_row(fns[kind], idx, ex, clamp, "triton"), (u, v), go)
        tol = {torch.float64: 1e-10, torch.float32: 2e-4}.get(dtype, 2e-2)
        case = f"{kind} B{B} I{n_items} d{d} K{K} {str(dtype)[6:]} clamp={clamp}"
        res.append(check_row(OP, case, got, want, tol, tol))
    return res


# ------------------------------------------------------------------------------------- benchmarks
def dense_listwise(u, v, ranked, mask):
    """The dense formula: the B x I score matrix, a dense mask of the left-out items, autograd."""
    S = u @ v.T
    lt = torch.logsumexp(S.masked_fill(mask, float("-inf")), 1)
    s = S.gather(1, ranked.clamp_min(0)).masked_fill(ranked < 0, float("-inf"))
    return plackett_luce_loss(s, None, lt, "sum")


def dense_mask(n_items, ranked, exclude):
    """[B, I] bool: the excluded items and the ranked ones (the tail leaves both out)."""
    indptr, ids = exclude
    B = ranked.shape[0]
    rows = torch.repeat_interleave(torch.arange(B, device=ranked.device), indptr[1:] - indptr[:-1])
    mask = torch.zeros(B, n_items, dtype=torch.bool, device=ranked.device)
    mask[rows, ids] = True
    valid = ranked >= 0
    mask[torch.arange(B, device=ranked.device)[:, None].expand_as(ranked)[valid], ranked[valid]] = (
        True
    )
    return mask


def _inputs(p, device):
    u, v, idx, ex = inputs(p["B"], p["I"], p["d"], p["K"], p["n_ex"], torch.float32, device, seed=0)
    u.requires_grad_(True)
    v.requires_grad_(True)
    return SimpleNamespace(u=u, v=v, idx=idx, ex=ex, leaves=(u, v), device=device)


def _loss(x, backend):
    return lambda: kdfast.full_catalog_listwise_loss(x.u, x.v, x.idx, exclude=x.ex, backend=backend)


def _kdfast(backend=None, allow_tf32=False, forward_only=False):
    def make(x, p):
        fn = _loss(x, backend or p["backend"])

        def call():
            with tf32(allow_tf32), torch.set_grad_enabled(not forward_only):
                return fn()

        return Step(
            call, leaves=() if forward_only else x.leaves, reps=p.get("reps", 10), max_seconds=15
        )

    return make


def _dense(compiled):
    def make(x, p):
        mask = dense_mask(x.v.shape[0], x.idx, x.ex)
        fn = torch.compile(dense_listwise) if compiled else dense_listwise
        return Step(
            lambda: fn(x.u, x.v, x.idx, mask),
            leaves=x.leaves,
            reps=3,
            max_seconds=10,
            note="dense mask built beforehand",
        )

    return make


LISTWISE = Bench(
    op="full_catalog_listwise_loss",
    cases={
        # CPU: a batch of users against CiteULike-t's 25181 items, ~22 training items each
        "cpu": {
            "small": dict(B=128, I=25181, d=64, K=50, n_ex=22),
            "large": dict(B=1024, I=25181, d=64, K=50, n_ex=22),
        },
        "cuda": {
            "small": dict(B=256, I=1 << 16, d=64, K=50, n_ex=100),
            "large": dict(B=2048, I=1 << 20, d=64, K=50, n_ex=100),
            "smoke": dict(B=4, I=300, d=16, K=5, n_ex=3, reps=3),
        },
    },
    inputs=_inputs,
    label=lambda p: f"B={p['B']} I={p['I']} d={p['d']} K={p['K']} excl~{p['n_ex']}/row float32",
    providers=(
        Provider("kdfast {backend} forward only", _kdfast(forward_only=True)),
        Provider("kdfast {backend}", _kdfast()),
        Provider(
            "kdfast triton (tf32 allowed)", _kdfast("triton", allow_tf32=True), kinds=("cuda",)
        ),
        Provider("eager reference", _kdfast("torch")),
        Provider("eager dense B x I", _dense(False)),
        Provider("torch.compile(dense B x I)", _dense(True)),
    ),
)
BENCHES = (LISTWISE,)


def timings(device, smoke):
    return gpu_timings(BENCHES, device, smoke)
