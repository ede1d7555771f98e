"""GPU checks and timings of kdfast.topk_scores (Triton backend, both kernel variants); see bench/gpu.py.

Checks: fresh random inputs (users.dat-like ragged exclusion rows, NaN keys, integer-valued embeddings
with many ties, k > n_k), float32 (IEEE and TF32), bfloat16, float16, both variants, compared with the
reference tie-aware: the same empty slots, no excluded or repeated index, and the float64 scores of the
chosen keys equal, position by position, those of the reference's keys (within a rounding tolerance), so
near-ties may swap but nothing else. Integer embeddings must match the reference exactly.
Timings at the issue's shape (n_q=32768, n_k=2^20, d=64, k=100): each variant vs the eager reference vs
torch.compile(reference) (at a smaller n_q; it compiles a Python loop), plus the matmul floor
2*n_q*n_k*d / (rate of a compute-bound 8192^3 torch.mm in the same precision) measured in this run.
"""
from __future__ import annotations

import contextlib

import torch

from bench.common import peak_extra_mb, time_ms
from kdfast.reference.topk import topk_scores as ref_topk
from kdfast.triton import topk as tri

OP = "topk_scores"


@contextlib.contextmanager
def tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def ragged_exclusions(n_q, n_k, mean, gen, device):
    """users.dat-like rows: lengths ~ lognormal (some empty, some long), ids uniform (repeats allowed)."""
    lengths = torch.exp(torch.randn(n_q, generator=gen) * 1.0 + float(torch.log(torch.tensor(mean)))).long()
    lengths[::7] = 0
    lengths = lengths.clamp(max=n_k)
    indptr = torch.zeros(n_q + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(lengths, 0)
    ids = torch.randint(0, n_k, (int(indptr[-1]),), generator=gen)
    return indptr.to(device), ids.to(device)


def compare(q, kk, excl, vals, idx, rvals, ridx, *, exact=False, tol=1e-5):
    """'' when (vals, idx) agree with the reference (rvals, ridx) tie-aware, else what differs."""
    if exact:
        if not torch.equal(idx, ridx):
            return f"indices differ in {(idx != ridx).sum().item()} slots (integer scores must match exactly)"
        if not torch.equal(vals, rvals):
            return "values differ (integer scores must match exactly)"
        return ""
    if torch.isnan(vals).any():
        return "NaN in values"
    if not torch.equal(idx == -1, ridx == -1):
        return f"empty slots differ: {(idx == -1).sum().item()} vs reference {(ridx == -1).sum().item()}"
    if not torch.equal(torch.isneginf(vals), torch.isneginf(rvals)):
        return "-inf slots differ"
    n_q, n_k = q.shape[0], kk.shape[0]
    valid = idx >= 0
    safe = idx.clamp(min=0)
    u = torch.where(valid, idx, -1 - torch.arange(idx.shape[1], device=idx.device))
    u = torch.sort(u, dim=1).values
    dup = (u[:, 1:] == u[:, :-1]).any()
    if dup:
        return "an index repeats within a row"
    indptr, ids = excl
    if ids.numel():
        rows = torch.repeat_interleave(torch.arange(n_q, device=q.device), indptr[1:] - indptr[:-1])
        banned = torch.zeros(n_q * n_k, dtype=torch.bool, device=q.device)
        banned[rows * n_k + ids] = True
        hit = banned[(torch.arange(n_q, device=q.device)[:, None] * n_k + safe)] & valid
        if hit.any():
            return f"{hit.sum().item()} excluded keys returned"
    q64, k64 = q.double(), kk.double()
    scale = q64.norm(dim=1, keepdim=True) * k64.norm(dim=1).max() + 1e-30

    def exact_scores(ix):
        e = torch.einsum("rd,rjd->rj", q64, k64[ix.clamp(min=0)])
        e = torch.where(torch.isnan(e), torch.full_like(e, float("-inf")), e)
        return torch.where(ix >= 0, e, torch.full_like(e, float("-inf")))

    e_out = exact_scores(idx)
    e_ref = exact_scores(ridx)
    fin = torch.isfinite(e_ref)
    e_out_sorted = torch.sort(e_out, dim=1, descending=True).values
    if not torch.equal(torch.isfinite(e_out_sorted), fin):
        return "finite-score slots differ"
    diff = ((e_out_sorted - e_ref).abs() / scale).where(fin, torch.zeros_like(e_ref)).max().item()
    if diff > tol:
        return f"scores of the chosen keys differ from the reference's by {diff:.3g} (rel.) > {tol}"
    vdiff = ((vals.double() - e_out).abs() / scale).where(torch.isfinite(e_out), torch.zeros_like(e_out)).max().item()
    if vdiff > tol:
        return f"returned values differ from the chosen keys' scores by {vdiff:.3g} (rel.)"
    return ""


def _cases(smoke):
    if smoke:
        return [("ragged-excl", 5, 70, 8, 10, 4), ("k>n_k", 3, 20, 8, 30, 0)]
    return [("users.dat-like", 5219, 25181, 64, 100, 40), ("odd d=200,k=50", 777, 100003, 200, 50, 30),
            ("k=500", 300, 50000, 64, 500, 60), ("k>n_k", 50, 90, 32, 100, 10),
            ("few rows (split-K)", 40, 300007, 64, 100, 100)]


def checks(device, smoke):
    out = []
    gen = torch.Generator().manual_seed(0)
    variants_cfg = [("buffer", {}), ("merge", {})]
    if smoke:
        variants_cfg = [("buffer", {"block_m": 16, "block_n": 16}), ("merge", {"block_m": 16})]
    dtypes = [("fp32-ieee", torch.float32, False, 1e-5), ("tf32", torch.float32, True, 3e-3),
              ("bf16", torch.bfloat16, False, 1e-5), ("fp16", torch.float16, False, 1e-5)]
    if smoke:
        dtypes = dtypes[:1]
    for name, n_q, n_k, d, k, mean_excl in _cases(smoke):
        excl = ragged_exclusions(n_q, n_k, max(mean_excl, 1), gen, device) if mean_excl else (
            torch.zeros(n_q + 1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))
        for dname, dt, allow_tf32, tol in dtypes:
            q = torch.randn(n_q, d, generator=gen).to(device, dt)
            kk = torch.randn(n_k, d, generator=gen).to(device, dt)
            if name == "users.dat-like":
                kk[torch.randint(0, n_k, (20,), generator=gen)] = float("nan")
            with tf32(allow_tf32):
                rv, ri = ref_topk(q, kk, k, *excl)
                for variant, kw in variants_cfg:
                    if variant == "merge" and n_k > 100000 and not smoke:
                        continue  # the simple variant is slow on long key ranges; checked on the others
                    try:
                        v, i = tri.topk_scores(q, kk, k, *excl, variant=variant, **kw)
                        why = compare(q, kk, excl, v, i, rv, ri, tol=tol)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        why = f"{type(exc).__name__}: {str(exc)[:300]}"
                    out.append({"op": OP, "case": f"{variant} {dname} {name}", "ok": not why, "detail": why})
    # integer-valued embeddings: many exact ties, every precision must reproduce the reference exactly
    n_q, n_k, d, k = (4, 60, 8, 12) if smoke else (1000, 40000, 64, 100)
    q = torch.randint(-2, 3, (n_q, d), generator=gen).float().to(device)
    kk = torch.randint(-2, 3, (n_k, d), generator=gen).float().to(device)
    excl = ragged_exclusions(n_q, n_k, 5 if smoke else 50, gen, device)
    rv, ri = ref_topk(q, kk, k, *excl)
    for dname, dt, allow_tf32 in [("fp32-ieee", torch.float32, False), ("tf32", torch.float32, True),
                                  ("bf16", torch.bfloat16, False)]:
        for variant, kw in variants_cfg:
            with tf32(allow_tf32):
                try:
                    v, i = tri.topk_scores(q.to(dt), kk.to(dt), k, *excl, variant=variant, **kw)
                    why = compare(q, kk, excl, v, i, rv, ri, exact=True)
                except Exception as exc:  # noqa: BLE001
                    why = f"{type(exc).__name__}: {str(exc)[:300]}"
            out.append({"op": OP, "case": f"{variant} {dname} integer ties", "ok": not why, "detail": why})
    return out


def _mm_rate(device, dt, allow_tf32, smoke):
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    with tf32(allow_tf32):
        ms = time_ms(lambda: torch.mm(a, b), device, warmup=2, reps=5)
    return 2 * n**3 / (ms * 1e-3)


def timings(device, smoke):
    rows = []
    if smoke:
        n_q, n_k, d, k, n_q_c = 16, 300, 16, 10, 8
        cfgs = [("buffer", {"block_m": 16, "block_n": 16}), ("merge", {"block_m": 16})]
    else:
        n_q, n_k, d, k, n_q_c = 32768, 2**20, 64, 100, 1024
        cfgs = [("buffer", {}), ("buffer", {"block_m": 128}), ("buffer", {"block_m": 64, "block_n": 64}),
                ("buffer", {"block_m": 64, "num_stages": 3}), ("merge", {})]
    gen = torch.Generator().manual_seed(1)
    shape = f"n_q={n_q},n_k={n_k},d={d},k={k}"
    empty = (torch.zeros(n_q + 1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))
    q32 = torch.randn(n_q, d, generator=gen).to(device)
    k32 = torch.randn(n_k, d, generator=gen).to(device)
    for prec, dt, allow_tf32 in [("fp32-ieee", torch.float32, False), ("tf32", torch.float32, True),
                                 ("bf16", torch.bfloat16, False)]:
        q, kk = q32.to(dt), k32.to(dt)
        floor_ms = 2 * n_q * n_k * d / _mm_rate(device, dt, allow_tf32, smoke) * 1e3
        rows.append({"op": OP, "shape": shape, "impl": f"matmul floor {prec}", "ms": floor_ms,
                     "note": "2*n_q*n_k*d / rate of an 8192^3 torch.mm"})
        with tf32(allow_tf32):
            ref_ms = time_ms(lambda: ref_topk(q, kk, k, *empty), device, warmup=1, reps=2)
            rows.append({"op": OP, "shape": shape, "impl": f"eager reference {prec}", "ms": ref_ms,
                         "peak_MB": peak_extra_mb(lambda: ref_topk(q, kk, k, *empty), device)})
            for variant, kw in cfgs:
                fn = (lambda kw=kw, variant=variant: tri.topk_scores(q, kk, k, *empty, variant=variant, **kw))
                try:
                    ms = time_ms(fn, device, warmup=1, reps=5, max_seconds=5)
                    cfg = tri.plan(n_q, n_k, d, k, device, variant=variant, **kw)
                    ck = tri.LAST_LAUNCH.get("kernel")
                    regs = f"regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')} "
                    note = regs + (f"BM={cfg['BM']} BN={cfg['BN']} splits={cfg['splits']} warps={cfg['num_warps']} "
                            f"stages={cfg['num_stages']}; {ref_ms / ms:.1f}x eager, floor/ms={floor_ms / ms:.2f}")
                    rows.append({"op": OP, "shape": shape, "impl": f"triton {variant} {prec}", "ms": ms,
                                 "peak_MB": peak_extra_mb(fn, device), "note": note})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"op": OP, "shape": shape, "impl": f"triton {variant} {prec}", "ms": float("nan"),
                                 "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
            # torch.compile of the reference, at fewer queries (it compiles the Python tile loop)
            qc = q[:n_q_c]
            emp_c = (empty[0][: n_q_c + 1], empty[1])
            shape_c = f"n_q={n_q_c},n_k={n_k},d={d},k={k}"
            e_ms = time_ms(lambda: ref_topk(qc, kk, k, *emp_c), device, warmup=1, reps=3)
            rows.append({"op": OP, "shape": shape_c, "impl": f"eager reference {prec}", "ms": e_ms})
            t_ms = time_ms(lambda: tri.topk_scores(qc, kk, k, *emp_c), device, warmup=1, reps=5)
            rows.append({"op": OP, "shape": shape_c, "impl": f"triton buffer {prec}", "ms": t_ms,
                         "note": f"{e_ms / t_ms:.1f}x eager"})
            if prec != "tf32":
                try:
                    comp = torch.compile(ref_topk)
                    c_ms = time_ms(lambda: comp(qc, kk, k, *emp_c), device, warmup=2, reps=3, max_seconds=10)
                    rows.append({"op": OP, "shape": shape_c, "impl": f"torch.compile reference {prec}", "ms": c_ms,
                                 "note": f"triton {c_ms / t_ms:.1f}x faster"})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"op": OP, "shape": shape_c, "impl": f"torch.compile reference {prec}",
                                 "ms": float("nan"), "note": "failed: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:200]})
    return rows
