"""GPU checks and timings of the topology losses: FTD (kdfast.topology_loss) and the HTD entity-level
grouped loss (kdfast.grouped_topology_loss).

checks(): the Triton backend against the float64 direct N x N formulas on the GPU (autograd of
kdfast.reference.topology), fresh random inputs with zero rows, float32 (and bfloat16 for FTD),
loss and student/teacher gradients with grad_output != 1; freed NaN-filled memory is left in the
caching allocator first so that an unwritten gradient element shows up; NaN/inf fails.
timings(): forward+backward (student gradient) of kdfast triton vs the eager direct formula vs
torch.compile of it, with peak extra memory. Shapes: N=16384 entities, d_t=200, d_s=20 (docs/METHODS.md section 1: teacher
dim 200, student 10% of it), K=30 groups for HTD (uniform random group ids).
"""
from __future__ import annotations

import torch

import kdfast
from bench.common import add_row, peak_extra_mb, rel_err, time_ms
from kdfast.ops.topology import reference as ref

OP = "topology"


def _poison(device):
    if torch.device(device).type == "cuda":
        x = torch.full((1 << 26,), float("nan"), device=device)
        del x


def _inputs(n, dt, ds, dtype, device, seed, k=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(n, dt, generator=g)
    s = torch.randn(n, ds, generator=g)
    if n > 4:
        t[1] = 0
        s[3] = 0
    groups = None if k is None else torch.randint(0, k, (n,), generator=g).to(device)
    return t.to(device=device, dtype=dtype), s.to(device=device, dtype=dtype), groups


def _result(case, errs, tensors, tol):
    finite = all(bool(torch.isfinite(x).all()) for x in tensors)
    ok = finite and all(e <= tol for e in errs)
    return {"op": OP, "case": case, "ok": ok,
            "detail": "rel_err " + ", ".join(f"{e:.2e}" for e in errs) + ("" if finite else " NON-FINITE")}


def checks(device, smoke):
    res = []
    ftd_shapes = [(7, 5, 3), (40, 70, 9)] if smoke else [(16384, 200, 20), (1, 3, 2), (1000, 64, 7), (4099, 257, 33)]
    # both gradients (every column tile), and a frozen teacher (the student's column tiles only, as timed)
    for n, dt, ds in ftd_shapes:
        for dtype, teacher_grad in ((torch.float32, True), (torch.bfloat16, True), (torch.float32, False)):
            t, s, _ = _inputs(n, dt, ds, dtype, device, seed=n + dt)
            go = 0.61
            tr, sr = t.double().requires_grad_(), s.double().requires_grad_()
            want = ref.topology_loss(tr, sr)
            (want * go).backward()
            _poison(device)
            tt, ss = t.clone().requires_grad_(teacher_grad), s.clone().requires_grad_()
            got = kdfast.topology_loss(tt, ss, backend="triton")
            (got * go).backward()
            tol = 2e-5 if dtype == torch.float32 else 2e-2
            errs = [rel_err(got.detach(), want.detach()), rel_err(ss.grad, sr.grad)]
            tensors = [got, ss.grad]
            if teacher_grad:
                errs.append(rel_err(tt.grad, tr.grad))
                tensors.append(tt.grad)
            case = f"ftd N{n} dt{dt} ds{ds} {str(dtype)[6:]}" + ("" if teacher_grad else " frozen teacher")
            res.append(_result(case, errs, tensors, tol))
    grp_shapes = [(9, 5, 3, 2), (70, 66, 5, 3)] if smoke else [(16384, 200, 20, 30), (1, 3, 2, 1), (3001, 64, 7, 5),
                                                             (2000, 200, 20, 1)]
    for n, dt, ds, k in grp_shapes:
        for filt in (True, False):
            t, s, groups = _inputs(n, dt, ds, torch.float32, device, seed=n * k, k=k)
            go = -1.3
            sr = s.double().requires_grad_()
            want, _ = ref.grouped_topology_loss(t.double(), sr, groups, filt)
            (want * go).backward()
            _poison(device)
            ss = s.clone().requires_grad_()
            got = kdfast.grouped_topology_loss(t, ss, groups, k, teacher_cos_filter=filt, backend="triton")
            (got * go).backward()
            errs = [rel_err(got.detach(), want.detach()), rel_err(ss.grad, sr.grad)]
            res.append(_result(f"grouped N{n} K{k} filter={filt}", errs, [got, ss.grad], 2e-5))
    return res


def _time(fn, leaves, device, reps):
    def step():
        for x in leaves:
            x.grad = None
        fn().backward()
    ms = time_ms(step, device, warmup=2, reps=reps, max_seconds=8.0)
    mb = peak_extra_mb(step, device)
    for x in leaves:
        x.grad = None
    return ms, mb


def _compiled(fn, probe):
    try:
        comp = torch.compile(fn)
        probe(comp)
        return comp, None
    except Exception as exc:  # noqa: BLE001
        return None, f"compile failed: {type(exc).__name__}: {str(exc)[:80]}"


def timings(device, smoke):
    rows = []
    n, dt, ds, k = (64, 20, 5, 3) if smoke else (16384, 200, 20, 30)
    t, s, groups = _inputs(n, dt, ds, torch.float32, device, seed=1, k=k)
    s.requires_grad_()
    shape = f"N={n} dt={dt} ds={ds}"
    impls = [("kdfast triton", lambda: kdfast.topology_loss(t, s, backend="triton"), 50),
             ("eager direct N x N", lambda: ref.topology_loss(t, s), 10)]
    comp, why = _compiled(ref.topology_loss, lambda c: c(t, s).backward())
    if comp is not None:
        impls.append(("torch.compile(direct)", lambda: comp(t, s), 10))
    else:
        yield add_row(rows, {"op": "ftd", "shape": shape, "impl": "torch.compile(direct)", "ms": float("nan"),
                             "note": why})
    for name, fn, reps in impls:
        ms, mb = _time(fn, [s], device, reps)
        yield add_row(rows, {"op": "ftd", "shape": shape, "impl": name, "ms": ms, "peak_MB": mb,
                             "note": "fwd+bwd (student grad)"})
    with torch.no_grad():
        ms = time_ms(lambda: kdfast.topology_loss(t, s, backend="triton"), device, reps=50)
    yield add_row(rows, {"op": "ftd", "shape": shape, "impl": "kdfast triton (forward only)", "ms": ms})

    shape = f"N={n} K={k} dt={dt} ds={ds} filter"

    def masked(a, b):
        return ref.grouped_topology_loss(a, b, groups, True)[0]

    impls = [("kdfast triton", lambda: kdfast.grouped_topology_loss(t, s, groups, k, backend="triton"), 30),
             ("eager masked N x N", lambda: masked(t, s), 10)]
    comp, why = _compiled(masked, lambda c: c(t, s).backward())
    if comp is not None:
        impls.append(("torch.compile(masked)", lambda: comp(t, s), 10))
    else:
        yield add_row(rows, {"op": "htd-entity", "shape": shape, "impl": "torch.compile(masked)", "ms": float("nan"),
                             "note": why})
    for name, fn, reps in impls:
        ms, mb = _time(fn, [s], device, reps)
        yield add_row(rows, {"op": "htd-entity", "shape": shape, "impl": name, "ms": ms, "peak_MB": mb,
                             "note": "fwd+bwd (student grad)"})
    ms, mb = _time(lambda: kdfast.grouped_topology_loss(t, s, groups, k, teacher_cos_filter=False,
                                                        backend="triton"), [s], device, 30)
    yield add_row(rows, {"op": "htd-entity", "shape": shape.replace("filter", "no filter"), "impl": "kdfast triton",
                         "ms": ms, "peak_MB": mb, "note": "fwd+bwd (student grad)"})
