"""The topology losses, FTD (kdfast.topology_loss) and the HTD entity-level grouped loss
(kdfast.grouped_topology_loss): benchmark cases and providers, and the GPU checks of the Triton
backend.

Providers, forward + backward (student gradient): kdfast on the device's backend (and its forward
alone; for HTD also with the teacher-cosine filter off, a different loss that both fast backends
compute through per-group Grams), the eager direct / masked N x N formulas (the references) and
torch.compile of them. Shapes: N=16384 entities on the GPU, d_t=200, d_s=20 (docs/METHODS.md section
1: teacher dim 200, student 10% of it), K=30 groups for HTD (uniform random group ids).

Checks: the Triton backend against the float64 direct N x N formulas on the GPU (autograd of the
references), fresh random inputs with zero rows, float32 (and bfloat16 for FTD), loss and student /
teacher gradients with grad_output != 1, a frozen teacher too; freed NaN-filled memory is left in
the caching allocator first so that an unwritten gradient element shows up; NaN/inf fails.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

import kdfast
from bench.harness import (
    Bench,
    Provider,
    Step,
    check_row,
    gpu_timings,
    non_finite_row,
    poison_cuda_cache,
    value_and_grads,
)
from kdfast.ops.topology import reference as ref

OP = "topology"


def inputs(n, dt, ds, dtype, device, seed, k=None):
    """(teacher [n, dt], student [n, ds], groups [n] in [0, k) or None); rows 1 (teacher) and 3
    (student) are zero."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(n, dt, generator=g)
    s = torch.randn(n, ds, generator=g)
    if n > 4:
        t[1] = 0
        s[3] = 0
    groups = None if k is None else torch.randint(0, k, (n,), generator=g).to(device)
    return t.to(device=device, dtype=dtype), s.to(device=device, dtype=dtype), groups


def _poisoned(fn):
    def call(*args):
        poison_cuda_cache(args[0].device)
        return fn(*args)

    return call


def _grouped(teacher, groups, k, filt, backend):
    """student -> the HTD entity-level loss: the masked N x N reference ("torch"), or kdfast."""
    if backend == "torch":
        return lambda student: ref.grouped_topology_loss(teacher, student, groups, filt)[0]
    return _poisoned(
        lambda student: kdfast.grouped_topology_loss(
            teacher, student, groups, k, teacher_cos_filter=filt, backend=backend
        )
    )


def _scale_free(device):
    """Cosines do not depend on a row's scale: rows of norm 1e20 or 1e-25 (whose float32 squares
    overflow or underflow) give the loss of the unscaled rows, FTD and HTD."""
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    scale = torch.tensor([1e20, 1e-25, 1.0, 1e15, 1e-18, 3.0])[:, None]
    groups = torch.tensor([0, 0, 1, 1, 0, 1], device=device)
    ts, ss = (t * scale).to(device), (s * scale).to(device)
    got = torch.stack(
        [
            kdfast.topology_loss(ts, ss, backend="triton"),
            kdfast.grouped_topology_loss(ts, ss, groups, 2, backend="triton"),
        ]
    )
    want = torch.stack(
        [
            ref.topology_loss(t.double(), s.double()),
            ref.grouped_topology_loss(t.double(), s.double(), groups.cpu())[0],
        ]
    )
    return got, want


def checks(device, smoke):
    res = []
    ftd_shapes = (
        [(7, 5, 3), (40, 70, 9)]
        if smoke
        else [(16384, 200, 20), (1, 3, 2), (1000, 64, 7), (4099, 257, 33)]
    )
    # both gradients (every column tile), and a frozen teacher (the student's column tiles only, as
    # timed)
    for n, dt, ds in ftd_shapes:
        for dtype, teacher_grad in (
            (torch.float32, True),
            (torch.bfloat16, True),
            (torch.float32, False),
        ):
            t, s, _ = inputs(n, dt, ds, dtype, device, seed=n + dt)
            go = 0.61
            want = value_and_grads(ref.topology_loss, (t, s), go, dtype=torch.float64)
            got = value_and_grads(
                _poisoned(lambda a, b: kdfast.topology_loss(a, b, backend="triton")),
                (t, s),
                go,
                requires=(teacher_grad, True),
            )
            tol = 2e-5 if dtype == torch.float32 else 2e-2
            case = f"ftd N{n} dt{dt} ds{ds} {str(dtype)[6:]}" + (
                "" if teacher_grad else " frozen teacher"
            )
            # gradients in the order student, teacher (the teacher's only when it requires grad)
            res.append(
                check_row(OP, case, (got[0], got[1][::-1]), (want[0], want[1][::-1]), tol, tol)
            )
    grp_shapes = (
        [(9, 5, 3, 2), (70, 66, 5, 3)]
        if smoke
        else [(16384, 200, 20, 30), (1, 3, 2, 1), (3001, 64, 7, 5), (2000, 200, 20, 1)]
    )
    for n, dt, ds, k in grp_shapes:
        for filt in (True, False):
            t, s, groups = inputs(n, dt, ds, torch.float32, device, seed=n * k, k=k)
            go = -1.3
            want = value_and_grads(
                _grouped(t.double(), groups, k, filt, "torch"), (s,), go, dtype=torch.float64
            )
            got = value_and_grads(_grouped(t, groups, k, filt, "triton"), (s,), go)
            res.append(check_row(OP, f"grouped N{n} K{k} filter={filt}", got, want, 2e-5, 2e-5))
    res.append(non_finite_row(OP, "rows of norm 1e20 and 1e-25", lambda: _scale_free(device)))
    return res


# ------------------------------------------------------------------------------------- benchmarks
def _inputs(p, device):
    t, s, groups = inputs(p["N"], p["dt"], p["ds"], torch.float32, device, seed=1, k=p.get("K"))
    s.requires_grad_()
    return SimpleNamespace(t=t, s=s, groups=groups, leaves=(s,), device=device)


def _step(fn, reps, x, forward_only=False):
    if forward_only:
        return Step(lambda: _no_grad(fn), reps=reps, max_seconds=8.0)
    return Step(
        fn, leaves=x.leaves, warmup=2 if x.device.type == "cuda" else 1, reps=reps, max_seconds=8.0
    )


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _reps(x, gpu):
    return gpu if x.device.type == "cuda" else 3


def _masked(x):
    return lambda a, b: ref.grouped_topology_loss(a, b, x.groups, True)[0]


def _ftd(x, p):
    return lambda: kdfast.topology_loss(x.t, x.s, backend=p["backend"])


def _htd(x, p, filt=True):
    return lambda: kdfast.grouped_topology_loss(
        x.t, x.s, x.groups, p["K"], teacher_cos_filter=filt, backend=p["backend"]
    )


FTD = Bench(
    op="topology_loss (FTD)",
    cases={
        "cpu": {"small": dict(N=2048, dt=200, ds=20), "large": dict(N=8192, dt=200, ds=20)},
        "cuda": {
            "small": dict(N=4096, dt=200, ds=20),
            "large": dict(N=16384, dt=200, ds=20),
            "smoke": dict(N=64, dt=20, ds=5),
        },
    },
    inputs=_inputs,
    label=lambda p: f"N={p['N']} dt={p['dt']} ds={p['ds']} float32",
    providers=(
        Provider("kdfast {backend}", lambda x, p: _step(_ftd(x, p), _reps(x, 50), x)),
        Provider(
            "kdfast {backend} forward only", lambda x, p: _step(_ftd(x, p), _reps(x, 50), x, True)
        ),
        Provider(
            "eager reference",
            lambda x, p: _step(lambda: ref.topology_loss(x.t, x.s), _reps(x, 10), x),
        ),
        Provider(
            "torch.compile(reference)",
            lambda x, p: _step(
                (lambda c: lambda: c(x.t, x.s))(torch.compile(ref.topology_loss)), _reps(x, 10), x
            ),
        ),
    ),
)

HTD = Bench(
    op="grouped_topology_loss (HTD entity level)",
    cases={
        "cpu": {
            "small": dict(N=4096, K=30, dt=200, ds=20),
            "large": dict(N=16384, K=30, dt=200, ds=20),
        },
        "cuda": {
            "small": dict(N=4096, K=30, dt=200, ds=20),
            "large": dict(N=16384, K=30, dt=200, ds=20),
            "smoke": dict(N=64, K=3, dt=20, ds=5),
        },
    },
    inputs=_inputs,
    label=lambda p: (
        f"N={p['N']} K={p['K']} dt={p['dt']} ds={p['ds']} float32, teacher-cosine filter on"
    ),
    providers=(
        Provider("kdfast {backend}", lambda x, p: _step(_htd(x, p), _reps(x, 30), x)),
        Provider(
            "kdfast {backend} filter off (per-group Gram; another loss)",
            lambda x, p: _step(_htd(x, p, filt=False), _reps(x, 30), x),
            comparable=False,
        ),
        Provider(
            "eager reference", lambda x, p: _step(lambda: _masked(x)(x.t, x.s), _reps(x, 10), x)
        ),
        Provider(
            "torch.compile(reference)",
            lambda x, p: _step(
                (lambda c: lambda: c(x.t, x.s))(torch.compile(_masked(x))), _reps(x, 10), x
            ),
        ),
    ),
)
BENCHES = (FTD, HTD)


def timings(device, smoke):
    return gpu_timings(BENCHES, device, smoke)
