"""The relaxed Plackett-Luce loss (score form and embedding-gather form): benchmark cases and
providers, and the GPU checks of the Triton backend.

Providers, forward + backward: kdfast on the device's backend, the eager reference, torch.compile of
the reference; for the score form also kdfast's forward alone, the backend's loss_and_grads alone
(the kernels without the op and autograd layers) and, on the GPU, the memory floor (the bytes that
must move / the rate of a device copy measured in the same run). The embedding form's memory
includes the dense [N, d] item gradient.

Checks: kdfast (triton) against the float64 reference on the GPU, fresh random inputs with -inf / -1
padding (fully padded rows included), float32 and bfloat16, values and gradients with grad_output !=
1; NaN or inf where the reference is finite fails; deterministic mode bitwise equal run to run.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

import kdfast
import kdfast.ops.plackett_luce as pl
from bench.harness import (
    Bench,
    Provider,
    Step,
    check_row,
    copy_rate,
    floor_step,
    gpu_timings,
    non_finite_row,
    poison_cuda_cache,
    value_and_grads,
)
from kdfast.ops.plackett_luce import reference as ref

OP = "plackett_luce"
# KDFAST_BENCH_COMPILE=0 skips the torch.compile providers (their compilation alone takes tens of
# seconds)
COMPILE = os.environ.get("KDFAST_BENCH_COMPILE", "1") != "0"


def scores(B, K, L, dtype, device, seed, scale=2.0):
    """(ranked [B, K] with ragged -inf padding and row 0 fully padded, unranked [B, L] with 20% -inf
    or None for L None, log_tail [B])."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randn(B, K, generator=g) * scale
    s[torch.arange(K)[None, :] >= torch.randint(0, K + 1, (B, 1), generator=g)] = float("-inf")
    s[0] = float("-inf")
    u = None
    if L is not None:
        u = torch.randn(B, L, generator=g) * scale
        u[torch.rand(B, L, generator=g) < 0.2] = float("-inf")
    t = torch.randn(B, generator=g) * scale + 3
    return [None if x is None else x.to(device=device, dtype=dtype) for x in (s, u)] + [
        t.to(device)
    ]


def embeddings(B, K, L, N, d, dtype, device, seed):
    """(query [B, d], item [N, d], ranked ids [B, K] with ragged -1 padding, unranked ids [B, L]
    with 20% -1, log_tail [B])."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(B, d, generator=g) * 0.3).to(device=device, dtype=dtype)
    e = (torch.randn(N, d, generator=g) * 0.3).to(device=device, dtype=dtype)
    ri = torch.randint(0, N, (B, K), generator=g)
    ri[torch.arange(K)[None, :] >= torch.randint(0, K + 1, (B, 1), generator=g)] = -1
    ri[0] = -1
    ui = torch.randint(0, N, (B, L), generator=g)
    ui[torch.rand(B, L, generator=g) < 0.2] = -1
    t = (torch.randn(B, generator=g) + 3).to(device)
    return q, e, ri.to(device), ui.to(device), t


def _kd_scores(a, b, c):
    poison_cuda_cache(a.device)
    return kdfast.plackett_luce_loss(a, b, log_tail=c, reduction="none", backend="triton")


def _ref_scores(a, b, c):
    return ref.plackett_luce_loss(a.double(), None if b is None else b.double(), c.double(), "none")


def _kd_emb(ri, ui):
    def fn(a, b, c):
        poison_cuda_cache(a.device)
        return kdfast.plackett_luce_loss_from_embeddings(
            a, b, ri, ui, log_tail=c, reduction="none", backend="triton"
        )

    return fn


def _ref_emb(ri, ui):
    return lambda a, b, c: ref.plackett_luce_loss_from_embeddings(
        a.double(), b.double(), ri, ui, c.double(), "none"
    )


def _non_finite(device):
    """The rule of every backend: a NaN among a row's scores or log_tail makes its loss NaN, a +inf
    unranked score or log_tail +inf; -inf is padding. Triton against the reference."""
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[1.0, 0.5]] * 5 + [[nan, 0.5]])
    u = torch.tensor([[0.2, nan], [0.2, inf], [0.2, -inf], [-inf, -inf], [-inf, -inf], [0.2, 0.1]])
    t = torch.tensor([0.0, 0.0, 0.0, nan, inf, 0.0])
    got = kdfast.plackett_luce_loss(
        s.to(device), u.to(device), log_tail=t.to(device), reduction="none", backend="triton"
    )
    return got, ref.plackett_luce_loss(s.double(), u.double(), t.double(), "none")


def _non_finite_emb(device):
    """The same rule when a score is gathered from a NaN or an inf embedding."""
    nan, inf = float("nan"), float("inf")
    q = torch.ones(3, 2)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [nan, 0.0], [inf, 0.0]])
    ri, ui = torch.tensor([[0, 1]] * 3), torch.tensor([[2, -1], [3, -1], [-1, -1]])
    got = kdfast.plackett_luce_loss_from_embeddings(
        q.to(device), e.to(device), ri.to(device), ui.to(device), reduction="none", backend="triton"
    )
    return got, ref.plackett_luce_loss_from_embeddings(q.double(), e.double(), ri, ui, None, "none")


def checks(device, smoke):
    res = []
    shapes = (
        [(5, 4, 7), (3, 1, None), (6, 9, 1)]
        if smoke
        else [(16384, 40, 400), (1000, 37, None), (333, 1, 1500), (4097, 129, 3), (1, 1, 1)]
    )
    for B, K, L in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            s, u, t = scores(B, K, L, dtype, device, seed=B + K)
            go = torch.rand(B, device=device) + 0.5
            out, grads = value_and_grads(_kd_scores, (s, u, t), go)
            out_r, grads_r = value_and_grads(_ref_scores, (s, u, t), go.double())
            tol_g = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients are stored in bf16
            case = f"scores B{B} K{K} L{L} {str(dtype)[6:]}"
            res.append(check_row(OP, case, (out, grads), (out_r, grads_r), 1e-5, tol_g))
    # scores of +-1e4 in float32: finite and exact (the raw-exp form overflows)
    s, u, t = scores(64 if smoke else 4096, 40, 400, torch.float32, device, seed=7, scale=3e3)
    go = torch.rand(s.shape[0], device=device) + 0.5
    out, grads = value_and_grads(_kd_scores, (s, u, t), go)
    out_r, grads_r = value_and_grads(_ref_scores, (s, u, t), go.double())
    res.append(check_row(OP, "scores |s|~1e4 float32", (out, grads), (out_r, grads_r), 1e-6, 1e-3))
    emb_shapes = (
        [(4, 3, 5, 7, 6), (3, 2, 9, 4, 17)]
        if smoke
        else [(4096, 40, 400, 2**20, 64), (512, 40, 400, 50, 64), (300, 7, 33, 1000, 200)]
    )
    for B, K, L, N, d in emb_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            q, e, ri, ui, t = embeddings(B, K, L, N, d, dtype, device, seed=B + N)
            go = torch.rand(B, device=device) + 0.5
            out, grads = value_and_grads(_kd_emb(ri, ui), (q, e, t), go)
            out_r, grads_r = value_and_grads(_ref_emb(ri, ui), (q, e, t), go.double())
            tol_v = 1e-5 if dtype == torch.float32 else 1e-4
            tol_g = 1e-5 if dtype == torch.float32 else 1e-2
            case = f"emb B{B} K{K} L{L} N{N} d{d} {str(dtype)[6:]}"
            res.append(check_row(OP, case, (out, grads), (out_r, grads_r), tol_v, tol_g))
    # deterministic mode: no atomics for the item gradient, bitwise equal run to run
    q, e, ri, ui, t = embeddings(
        64 if smoke else 2048, 40, 400, 1000, 64, torch.float32, device, seed=5
    )
    go = torch.rand(q.shape[0], device=device) + 0.5
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [value_and_grads(_kd_emb(ri, ui), (q, e, t), go) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    out_r, grads_r = value_and_grads(_ref_emb(ri, ui), (q, e, t), go.double())
    r = check_row(OP, "emb deterministic mode float32", runs[0], (out_r, grads_r), 1e-5, 1e-5)
    same = all(torch.equal(x, y) for x, y in zip(runs[0][1], runs[1][1]))
    r["ok"] = r["ok"] and same
    r["detail"] += f"; bitwise equal run to run: {same}"
    res.append(r)
    res.append(non_finite_row(OP, "non-finite scores", lambda: _non_finite(device)))
    res.append(non_finite_row(OP, "non-finite embeddings", lambda: _non_finite_emb(device)))
    return res


# ------------------------------------------------------------------------------------- benchmarks
def _dtype(p):
    return getattr(torch, p.get("dtype", "float32"))


def _fp32(p):
    return p.get("dtype", "float32") == "float32"


def _scores_inputs(p, device):
    s, u, t = (
        x.requires_grad_() for x in scores(p["B"], p["K"], p["L"], _dtype(p), device, seed=1)
    )
    return SimpleNamespace(s=s, u=u, t=t, leaves=(s, u, t), device=device)


def _emb_inputs(p, device):
    q, e, ri, ui, t = embeddings(p["B"], p["K"], p["L"], p["N"], p["d"], _dtype(p), device, seed=2)
    q.requires_grad_()
    e.requires_grad_()
    return SimpleNamespace(q=q, e=e, ri=ri, ui=ui, t=t, leaves=(q, e), device=device)


def _compiled(fn, args, leaves, reps):
    """torch.compile(fn)(*args), forward + backward (compiled on the first warm-up call)."""
    comp = torch.compile(fn)
    return Step(lambda: comp(*args), leaves=leaves, reps=reps)


def _reps(x, gpu, cpu=10):
    return gpu if x.device.type == "cuda" else cpu


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()

    return call


def _kd_loss(x, p):
    return lambda: kdfast.plackett_luce_loss(x.s, x.u, log_tail=x.t, backend=p["backend"])


def _numba_usable(p):
    return kdfast.backends()["numba"][0]


def _on_numba(make):
    """A provider's make on the numba backend (CPU, where numba imports)."""
    return lambda x, p: make(x, dict(p, backend="numba"))


def _memory_floor(x, p):
    B, K, L = p["B"], p["K"], p["L"]
    moved = 2 * B * (K + L) * x.s.element_size() + 3 * B * 4
    return floor_step(
        copy_rate(x.device), moved, "read scores once, write their gradients once (copy rate)"
    )


# the device's backend, then numba (CPU, where it imports): (name, make wrapper, Provider options)
_BACKENDS = (
    ("{backend}", lambda make: make, {}),
    ("numba", _on_numba, dict(kinds=("cpu",), when=_numba_usable)),
)

SCORES = Bench(
    op="plackett_luce_loss",
    cases={
        "cpu": {"small": dict(B=512, K=40, L=400), "large": dict(B=4096, K=40, L=400)},
        "cuda": {
            "small": dict(B=4096, K=40, L=400),
            "large": dict(B=16384, K=40, L=400),
            "large-bf16": dict(B=16384, K=40, L=400, dtype="bfloat16"),
            "smoke": dict(B=64, K=8, L=16),
        },
    },
    inputs=_scores_inputs,
    label=lambda p: f"B={p['B']} K={p['K']} L={p['L']} {p.get('dtype', 'float32')}",
    providers=(
        *(
            Provider(
                f"kdfast {name}",
                wrap(lambda x, p: Step(_kd_loss(x, p), leaves=x.leaves, reps=_reps(x, 50))),
                **kw,
            )
            for name, wrap, kw in _BACKENDS
        ),
        *(
            Provider(
                f"kdfast {name} forward only",
                wrap(lambda x, p: Step(_no_grad(_kd_loss(x, p)), reps=_reps(x, 50))),
                **kw,
            )
            for name, wrap, kw in _BACKENDS
        ),
        *(
            Provider(
                f"kdfast {name} backend loss_and_grads",
                wrap(
                    lambda x, p: Step(
                        lambda: pl.BACKENDS[p["backend"]]().loss_and_grads(x.s, x.u, x.t, True),
                        reps=_reps(x, 50),
                    )
                ),
                **kw,
            )
            for name, wrap, kw in _BACKENDS
        ),
        Provider(
            "eager reference",
            lambda x, p: Step(
                lambda: ref.plackett_luce_loss(x.s, x.u, x.t), leaves=x.leaves, reps=_reps(x, 20)
            ),
            when=_fp32,
        ),
        Provider(
            "torch.compile(reference)",
            lambda x, p: _compiled(ref.plackett_luce_loss, (x.s, x.u, x.t), x.leaves, _reps(x, 20)),
            when=lambda p: _fp32(p) and COMPILE,
        ),
        Provider("memory floor", _memory_floor, kinds=("cuda",)),
    ),
)

EMB = Bench(
    op="plackett_luce_loss_from_embeddings",
    cases={
        "cpu": {
            "small": dict(B=256, K=40, L=400, N=2**15, d=64),
            "large": dict(B=1024, K=40, L=400, N=2**17, d=64),
        },
        "cuda": {
            "small": dict(B=1024, K=40, L=400, N=2**17, d=64),
            "large": dict(B=16384, K=40, L=400, N=2**20, d=64),
            "smoke": dict(B=32, K=8, L=16, N=1000, d=16),
        },
    },
    inputs=_emb_inputs,
    label=lambda p: (
        f"B={p['B']} K={p['K']} L={p['L']} N={p['N']} d={p['d']} {p.get('dtype', 'float32')}"
    ),
    providers=(
        *(
            Provider(
                f"kdfast {name}",
                wrap(
                    lambda x, p: Step(
                        lambda: kdfast.plackett_luce_loss_from_embeddings(
                            x.q, x.e, x.ri, x.ui, log_tail=x.t, backend=p["backend"]
                        ),
                        leaves=x.leaves,
                        reps=_reps(x, 20),
                    )
                ),
                **kw,
            )
            for name, wrap, kw in _BACKENDS
        ),
        Provider(
            "eager reference",
            lambda x, p: Step(
                lambda: ref.plackett_luce_loss_from_embeddings(x.q, x.e, x.ri, x.ui, x.t),
                leaves=x.leaves,
                reps=_reps(x, 5, 5),
            ),
        ),
        Provider(
            "torch.compile(reference)",
            lambda x, p: _compiled(
                ref.plackett_luce_loss_from_embeddings,
                (x.q, x.e, x.ri, x.ui, x.t),
                x.leaves,
                _reps(x, 5, 5),
            ),
            when=lambda p: COMPILE,
        ),
    ),
)
BENCHES = (SCORES, EMB)


def timings(device, smoke):
    return gpu_timings(BENCHES, device, smoke)
