"""GPU checks and timings of kdfast.full_catalog_listwise_loss / full_catalog_set_loss (see bench/gpu.py)."""
from __future__ import annotations

import math

import torch

from bench.common import add_row, peak_extra_mb, rel_err, time_ms

OP = "full_catalog"


def _inputs(B, I, d, K, n_ex, dtype, device, seed, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = (torch.randn(B, d, generator=g) * scale / math.sqrt(d) ** 0.5).to(device=device, dtype=dtype)
    v = (torch.randn(I, d, generator=g) * scale / math.sqrt(d) ** 0.5).to(device=device, dtype=dtype)
    ranked = torch.randint(0, I, (B, K), generator=g)
    if K > 2:
        ranked[0, -2:] = -1  # padding
        ranked[-1, 1] = ranked[-1, 0]  # a repeat
    counts = torch.randint(0, 2 * n_ex + 1, (B,), generator=g)
    indptr = torch.zeros(B + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = torch.randint(0, I, (int(indptr[-1]),), generator=g)  # unsorted, with repeats
    return u, v, ranked.to(device), (indptr.to(device), indices.to(device))


def _run(fn, u, v, idx, ex, backend, go_seed=1, **kw):
    uu = u.detach().clone().requires_grad_(True)
    vv = v.detach().clone().requires_grad_(True)
    out = fn(uu, vv, idx, exclude=ex, reduction="none", backend=backend, **kw)
    go = torch.rand(out.shape, generator=torch.Generator(device="cpu").manual_seed(go_seed)).to(out) + 0.5
    gu, gv = torch.autograd.grad(out, (uu, vv), go)
    return out.detach(), gu, gv


def checks(device, smoke):
    import kdfast
    fns = {"listwise": kdfast.full_catalog_listwise_loss, "set": kdfast.full_catalog_set_loss}
    if smoke:
        cases = [("listwise", 4, 150, 8, 5, 3, torch.float32, None), ("set", 3, 97, 16, 4, 5, torch.float32, 1.0)]
    else:
        cases = [("listwise", 64, 5003, 64, 50, 50, torch.float32, None),
                 ("listwise", 33, 20011, 100, 17, 200, torch.float32, 40.0),
                 ("set", 64, 5003, 64, 60, 50, torch.float32, None),
                 ("listwise", 16, 3001, 32, 10, 20, torch.float64, None),
                 ("listwise", 64, 5003, 64, 50, 50, torch.bfloat16, None),
                 ("listwise", 2048, 1 << 20, 64, 50, 100, torch.float32, None)]
    res = []
    for i, (kind, B, I, d, K, n_ex, dtype, clamp) in enumerate(cases):
        u, v, idx, ex = _inputs(B, I, d, K, n_ex, dtype, device, seed=10 + i, scale=3.0 if clamp else 1.0)
        ref = _run(fns[kind], u, v, idx, ex, "torch", clamp=clamp)
        got = _run(fns[kind], u, v, idx, ex, "triton", clamp=clamp)
        tol = {torch.float64: 1e-10, torch.float32: 2e-4}.get(dtype, 2e-2)
        errs = [rel_err(a, b) for a, b in zip(got, ref)]
        finite = all(bool(torch.isfinite(t).all()) for t in got)
        res.append({"op": OP, "case": f"{kind} B{B} I{I} d{d} K{K} {str(dtype)[6:]} clamp={clamp}",
                    "ok": finite and max(errs) < tol,
                    "detail": "rel err loss/gu/gi " + " ".join(f"{e:.2e}" for e in errs)})
    return res


def _dense_listwise(u, v, ranked, mask):
    """Eager dense reference: the B x I score matrix, a dense exclusion mask, autograd."""
    from kdfast.ops.plackett_luce.reference import plackett_luce_loss
    S = u @ v.T
    lt = torch.logsumexp(S.masked_fill(mask, float("-inf")), 1)
    s = S.gather(1, ranked.clamp_min(0)).masked_fill(ranked < 0, float("-inf"))
    return plackett_luce_loss(s, None, lt, "sum")


def timings(device, smoke):
    import kdfast
    from kdfast._core.csr import with_ids as _merged_exclusions
    B, I, d, K, n_ex = (4, 300, 16, 5, 3) if smoke else (2048, 1 << 20, 64, 50, 100)
    shape = f"B{B} I{I} d{d} K{K}"
    u, v, idx, ex = _inputs(B, I, d, K, n_ex, torch.float32, device, seed=0)
    u.requires_grad_(True)
    v.requires_grad_(True)
    rows = []

    def step(backend):
        def f():
            loss = kdfast.full_catalog_listwise_loss(u, v, idx, exclude=ex, backend=backend)
            torch.autograd.grad(loss, (u, v))
        return f

    reps = dict(warmup=1, reps=3 if smoke else 10, max_seconds=15)

    def forward_only():
        with torch.no_grad():
            kdfast.full_catalog_listwise_loss(u, v, idx, exclude=ex, backend="triton")

    yield add_row(rows, {"op": OP, "shape": shape, "impl": "kdfast triton fp32 (ieee) fwd",
                         "ms": time_ms(forward_only, device, **reps), "peak_MB": peak_extra_mb(forward_only, device),
                         "note": ""})
    for name, backend, tf32 in [("kdfast triton fp32 (ieee)", "triton", False),
                                ("kdfast triton (tf32 allowed)", "triton", True),
                                ("kdfast torch chunked", "torch", False)]:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ms = time_ms(step(backend), device, **reps)
            yield add_row(rows, {"op": OP, "shape": shape, "impl": name + " fwd+bwd", "ms": ms,
                                 "peak_MB": peak_extra_mb(step(backend), device), "note": ""})
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    ip, ix = _merged_exclusions(ex[0], ex[1], idx, I)
    mask = torch.zeros(B, I, dtype=torch.bool, device=device)
    mask[torch.repeat_interleave(torch.arange(B, device=device), ip[1:] - ip[:-1]), ix] = True

    def dense(fn):
        def f():
            loss = fn(u, v, idx, mask)
            torch.autograd.grad(loss, (u, v))
        return f

    impls = [("eager dense reference", _dense_listwise)]
    try:
        impls.append(("torch.compile(dense reference)", torch.compile(_dense_listwise)))
    except Exception as exc:  # noqa: BLE001
        yield add_row(rows, {"op": OP, "shape": shape, "impl": "torch.compile(dense reference)", "ms": float("nan"),
                             "note": f"compile failed: {type(exc).__name__}"})
    for name, fn in impls:
        try:
            ms = time_ms(dense(fn), device, warmup=1, reps=3, max_seconds=10)
            yield add_row(rows, {"op": OP, "shape": shape, "impl": name + " fwd+bwd", "ms": ms,
                                 "peak_MB": peak_extra_mb(dense(fn), device), "note": "dense mask prebuilt"})
        except Exception as exc:  # noqa: BLE001 - OOM or compile failure is a result
            yield add_row(rows, {"op": OP, "shape": shape, "impl": name, "ms": float("nan"),
                                 "note": f"failed: {type(exc).__name__}: {str(exc)[:80]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
