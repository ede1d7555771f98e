"""GPU checks and timings of the relaxed Plackett-Luce loss (score form and embedding-gather form).

checks(): kdfast (triton) against the float64 reference on the GPU, fresh random inputs with -inf / -1
padding (fully padded rows included), float32 and bfloat16, values and gradients with grad_output != 1;
NaN or inf where the reference is finite fails. timings(): forward+backward of kdfast, the eager
reference and torch.compile(reference), peak extra memory, and the fraction of the memory roofline
(bytes that must move / bandwidth of a device copy measured in the same run).
"""
from __future__ import annotations

import os

import torch

import kdfast
from bench.common import add_row, peak_extra_mb, rel_err, sync, time_ms
from kdfast.ops.plackett_luce import reference as ref

OP = "plackett_luce"
# KDFAST_BENCH_COMPILE=0 skips the torch.compile baselines (their compilation alone takes tens of seconds)
COMPILE = os.environ.get("KDFAST_BENCH_COMPILE", "1") != "0"


def _scores(B, K, L, dtype, device, seed, scale=2.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randn(B, K, generator=g) * scale
    s[torch.arange(K)[None, :] >= torch.randint(0, K + 1, (B, 1), generator=g)] = float("-inf")
    s[0] = float("-inf")
    u = None
    if L is not None:
        u = torch.randn(B, L, generator=g) * scale
        u[torch.rand(B, L, generator=g) < 0.2] = float("-inf")
    t = torch.randn(B, generator=g) * scale + 3
    return [None if x is None else x.to(device=device, dtype=dtype) for x in (s, u)] + [t.to(device)]


def _emb(B, K, L, N, d, dtype, device, seed):
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


def _grads(fn, tensors, go):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in tensors]
    out = fn(*leaves)
    (out * go).sum().backward()
    return out.detach(), [None if x is None else x.grad for x in leaves]


def _check(case, out, grads, out_r, grads_r, tol_val, tol_grad):
    errs = [rel_err(out, out_r)] + [rel_err(g, gr) for g, gr in zip(grads, grads_r) if g is not None]
    finite_ok = bool(torch.isfinite(out).all()) and all(torch.isfinite(g).all() for g in grads if g is not None)
    ok = finite_ok and errs[0] <= tol_val and all(e <= tol_grad for e in errs[1:])
    return {"op": OP, "case": case, "ok": ok,
            "detail": f"rel_err value {errs[0]:.2e}, grads " + ", ".join(f"{e:.2e}" for e in errs[1:])
            + ("" if finite_ok else " NON-FINITE")}


def checks(device, smoke):
    res = []
    shapes = [(5, 4, 7), (3, 1, None), (6, 9, 1)] if smoke else \
        [(16384, 40, 400), (1000, 37, None), (333, 1, 1500), (4097, 129, 3), (1, 1, 1)]
    for B, K, L in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            s, u, t = _scores(B, K, L, dtype, device, seed=B + K)
            go = torch.rand(B, device=device) + 0.5
            out, grads = _grads(lambda a, b, c: kdfast.plackett_luce_loss(a, b, log_tail=c, reduction="none",
                                                                          backend="triton"), (s, u, t), go)
            out_r, grads_r = _grads(lambda a, b, c: ref.plackett_luce_loss(
                a.double(), None if b is None else b.double(), c.double(), "none"), (s, u, t), go.double())
            tol_g = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients are stored in bf16
            res.append(_check(f"scores B{B} K{K} L{L} {str(dtype)[6:]}", out, grads, out_r, grads_r, 1e-5, tol_g))
    # scores of +-1e4 in float32: finite and exact (the raw-exp form overflows)
    s, u, t = _scores(64 if smoke else 4096, 40, 400, torch.float32, device, seed=7, scale=3e3)
    go = torch.rand(s.shape[0], device=device) + 0.5
    out, grads = _grads(lambda a, b, c: kdfast.plackett_luce_loss(a, b, log_tail=c, reduction="none",
                                                                  backend="triton"), (s, u, t), go)
    out_r, grads_r = _grads(lambda a, b, c: ref.plackett_luce_loss(a.double(), b.double(), c.double(), "none"),
                            (s, u, t), go.double())
    res.append(_check("scores |s|~1e4 float32", out, grads, out_r, grads_r, 1e-6, 1e-3))
    emb_shapes = [(4, 3, 5, 7, 6), (3, 2, 9, 4, 17)] if smoke else \
        [(4096, 40, 400, 2**20, 64), (512, 40, 400, 50, 64), (300, 7, 33, 1000, 200)]
    for B, K, L, N, d in emb_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            q, e, ri, ui, t = _emb(B, K, L, N, d, dtype, device, seed=B + N)
            go = torch.rand(B, device=device) + 0.5
            out, grads = _grads(lambda a, b, c: kdfast.plackett_luce_loss_from_embeddings(
                a, b, ri, ui, log_tail=c, reduction="none", backend="triton"), (q, e, t), go)
            out_r, grads_r = _grads(lambda a, b, c: ref.plackett_luce_loss_from_embeddings(
                a.double(), b.double(), ri, ui, c.double(), "none"), (q, e, t), go.double())
            tol_v = 1e-5 if dtype == torch.float32 else 1e-4
            tol_g = 1e-5 if dtype == torch.float32 else 1e-2
            res.append(_check(f"emb B{B} K{K} L{L} N{N} d{d} {str(dtype)[6:]}", out, grads, out_r, grads_r,
                              tol_v, tol_g))
    # deterministic mode: no atomics for the item gradient, bitwise equal run to run
    q, e, ri, ui, t = _emb(64 if smoke else 2048, 40, 400, 1000, 64, torch.float32, device, seed=5)
    go = torch.rand(q.shape[0], device=device) + 0.5
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads(lambda a, b, c: kdfast.plackett_luce_loss_from_embeddings(
            a, b, ri, ui, log_tail=c, reduction="none", backend="triton"), (q, e, t), go) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    out_r, grads_r = _grads(lambda a, b, c: ref.plackett_luce_loss_from_embeddings(
        a.double(), b.double(), ri, ui, c.double(), "none"), (q, e, t), go.double())
    r = _check("emb deterministic mode float32", runs[0][0], runs[0][1], out_r, grads_r, 1e-5, 1e-5)
    same = all(torch.equal(x, y) for x, y in zip(runs[0][1], runs[1][1]))
    r["ok"] = r["ok"] and same
    r["detail"] += f"; bitwise equal run to run: {same}"
    res.append(r)
    return res


def _bandwidth_gbs(device):
    """Bytes read + written per second by a large device-to-device copy (GB/s)."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, warmup=2, reps=10)
    del x, y
    return 2 * 2**28 * 4 / ms / 1e6


def _time_fwd_bwd(fn, leaves, device, reps):
    def step():
        for x in leaves:
            x.grad = None
        fn().backward()
    ms = time_ms(step, device, warmup=3, reps=reps)
    for x in leaves:
        x.grad = None
    return ms, peak_extra_mb(step, device)


def timings(device, smoke):
    rows = []
    cuda = torch.device(device).type == "cuda"
    bw = _bandwidth_gbs(device) if cuda else None
    B, K, L = (64, 8, 16) if smoke else (16384, 40, 400)
    shape = f"B={B} K={K} L={L}"
    for dtype in (torch.float32, torch.bfloat16):
        s, u, t = (x.requires_grad_() for x in _scores(B, K, L, dtype, device, seed=1))
        floor_bytes = 2 * B * (K + L) * s.element_size() + 3 * B * 4
        impls = [("kdfast triton", lambda: kdfast.plackett_luce_loss(s, u, log_tail=t, backend="triton"), 50)]
        if dtype == torch.float32:
            impls.append(("eager reference", lambda: ref.plackett_luce_loss(s, u, t), 20))
        if dtype == torch.float32 and COMPILE:
            try:
                comp = torch.compile(ref.plackett_luce_loss)
                comp(s, u, t).backward()
                impls.append(("torch.compile(reference)", lambda: comp(s, u, t), 20))
            except Exception as exc:  # noqa: BLE001
                yield add_row(rows, {"op": OP, "shape": shape, "impl": "torch.compile(reference)", "ms": float("nan"),
                                     "note": f"compile failed: {type(exc).__name__}: {str(exc)[:80]}"})
        for name, fn, reps in impls:
            ms, mb = _time_fwd_bwd(fn, [s, u, t], device, reps)
            note = f"fwd+bwd {str(dtype)[6:]}"
            if bw:
                floor_ms = floor_bytes / bw / 1e6
                note += f"; floor {floor_ms:.4f} ms ({floor_ms / ms:.0%} of roofline, copy BW {bw:.0f} GB/s)"
            yield add_row(rows, {"op": OP, "shape": shape, "impl": name, "ms": ms, "peak_MB": mb, "note": note})
        with torch.no_grad():
            ms = time_ms(lambda: kdfast.plackett_luce_loss(s, u, log_tail=t, backend="triton"), device, reps=50)
            yield add_row(rows, {"op": OP, "shape": shape, "impl": "kdfast triton (forward only)", "ms": ms,
                                 "note": str(dtype)[6:]})
            from kdfast.triton import plackett_luce as tri
            go = torch.ones(B, device=device)

            def kernels():
                _, rest, inv = tri.forward(s, u, t)
                tri.backward(go, s, u, t, rest, inv)
            ms = time_ms(kernels, device, reps=50)
        note = f"the two kernels without the op/autograd layers, {str(dtype)[6:]}"
        if bw:
            note += f"; {floor_bytes / bw / 1e6 / ms:.0%} of roofline"
        yield add_row(rows, {"op": OP, "shape": shape, "impl": "kdfast triton kernels only", "ms": ms, "note": note})
        del s, u, t
    B, K, L, N, d = (32, 8, 16, 1000, 16) if smoke else (16384, 40, 400, 2**20, 64)
    shape = f"B={B} K={K} L={L} N={N} d={d}"
    q, e, ri, ui, t = _emb(B, K, L, N, d, torch.float32, device, seed=2)
    q.requires_grad_()
    e.requires_grad_()
    impls = [("kdfast triton", lambda: kdfast.plackett_luce_loss_from_embeddings(q, e, ri, ui, log_tail=t,
                                                                                 backend="triton"), 20),
             ("eager reference", lambda: ref.plackett_luce_loss_from_embeddings(q, e, ri, ui, t), 5)]
    try:
        if not COMPILE:
            raise RuntimeError("skipped (KDFAST_BENCH_COMPILE=0)")
        comp_e = torch.compile(ref.plackett_luce_loss_from_embeddings)
        comp_e(q, e, ri, ui, t).backward()
        impls.append(("torch.compile(reference)", lambda: comp_e(q, e, ri, ui, t), 5))
    except Exception as exc:  # noqa: BLE001
        yield add_row(rows, {"op": OP + "_emb", "shape": shape, "impl": "torch.compile(reference)", "ms": float("nan"),
                             "note": f"compile failed: {type(exc).__name__}: {str(exc)[:80]}"})
    gathered = B * (K + L) * d * 4
    for name, fn, reps in impls:
        ms, mb = _time_fwd_bwd(fn, [q, e], device, reps)
        note = "fwd+bwd float32; grad_item dense [N, d] included in memory"
        if bw:
            note += f"; gathered rows {gathered / 1e9:.2f} GB per pass, {gathered / ms / 1e6:.0f} GB/s per pass"
        yield add_row(rows, {"op": OP + "_emb", "shape": shape, "impl": name, "ms": ms, "peak_MB": mb, "note": note})
    sync(device)
