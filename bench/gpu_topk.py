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

from bench.common import add_row, peak_extra_mb, time_ms
from kdfast.ops.topk.reference import topk_scores as ref_topk
from kdfast.ops.topk import triton as tri

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


# Every GPU shape keeps n_q, n_k, d and the split chunk divisible by 16, so that one compiled kernel per
# (variant, dtype, precision) serves all of them (Triton specialises on divisibility): `python -m
# bench.gpu_topk --warm VARIANT:PREC` compiles one of them, several run in parallel before bench/gpu.py.
CHECK = (2000, 50000, 64, 100)
BIG = (32768, 2**20, 64, 100)
PRECS = {"ieee": (torch.float32, False, 1e-5), "tf32": (torch.float32, True, 3e-3),
         "bf16": (torch.bfloat16, False, 1e-5), "fp16": (torch.float16, False, 1e-5)}
GPU_CFGS = [("buffer", "ieee", {}), ("buffer", "tf32", {}), ("buffer", "bf16", {}), ("buffer", "fp16", {}),
            ("merge", "ieee", {}), ("merge", "bf16", {}), ("buffer", "bf16", {"block_m": 32})]


def _no_excl(n_q, device):
    return (torch.zeros(n_q + 1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))


def checks(device, smoke):
    out = []
    gen = torch.Generator().manual_seed(0)
    if smoke:
        cases = [("ragged-excl+NaN", 5, 70, 8, 10, 4), ("k>n_k", 3, 20, 8, 30, 0)]
        cfgs = [("buffer", "ieee", {"block_m": 16, "block_n": 16}), ("merge", "ieee", {"block_m": 16})]
        n_int = (4, 60, 8, 12)
    else:
        cases = [("users.dat-like excl+NaN, split-K", *CHECK, 40)]
        cfgs = [c for c in GPU_CFGS if not c[2]]
        n_int = CHECK
    for name, n_q, n_k, d, k, mean_excl in cases:
        excl = ragged_exclusions(n_q, n_k, mean_excl, gen, device) if mean_excl else _no_excl(n_q, device)
        for variant, prec, kw in cfgs:
            dt, allow_tf32, tol = PRECS[prec]
            q = torch.randn(n_q, d, generator=gen).to(device, dt)
            kk = torch.randn(n_k, d, generator=gen).to(device, dt)
            kk[torch.randint(0, n_k, (max(1, n_k // 2000),), generator=gen)] = float("nan")
            with tf32(allow_tf32):
                rv, ri = ref_topk(q, kk, k, *excl)
                try:
                    v, i = tri.topk_scores(q, kk, k, *excl, variant=variant, **kw)
                    why = compare(q, kk, excl, v, i, rv, ri, tol=tol)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    why = f"{type(exc).__name__}: {str(exc)[:300]}"
            out.append({"op": OP, "case": f"{variant} {prec} {name}", "ok": not why, "detail": why})
            print("[row]", out[-1], flush=True)
    # integer-valued embeddings: many exact ties; every precision must reproduce the reference exactly
    n_q, n_k, d, k = n_int
    q = torch.randint(-2, 3, (n_q, d), generator=gen).float().to(device)
    kk = torch.randint(-2, 3, (n_k, d), generator=gen).float().to(device)
    excl = ragged_exclusions(n_q, n_k, 5 if smoke else 50, gen, device)
    rv, ri = ref_topk(q, kk, k, *excl)
    for variant, prec, kw in cfgs:
        dt, allow_tf32, _ = PRECS[prec]
        with tf32(allow_tf32):
            try:
                v, i = tri.topk_scores(q.to(dt), kk.to(dt), k, *excl, variant=variant, **kw)
                why = compare(q, kk, excl, v, i, rv, ri, exact=True)
            except Exception as exc:  # noqa: BLE001
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
        out.append({"op": OP, "case": f"{variant} {prec} integer ties", "ok": not why, "detail": why})
        print("[row]", out[-1], flush=True)
    return out


def _mm_rate(device, dt, allow_tf32, smoke):
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    with tf32(allow_tf32):
        ms = time_ms(lambda: torch.mm(a, b), device, warmup=2, reps=5)
    return 2 * n**3 / (ms * 1e-3)


def _note(exc):
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def timings(device, smoke):
    rows = []
    if smoke:
        n_q, n_k, d, k = 16, 300, 16, 10
        cfgs = [("buffer", "ieee", {"block_m": 16, "block_n": 16}), ("merge", "ieee", {"block_m": 16})]
        precs = ["ieee"]
        n_q_merge = 16
    else:
        n_q, n_k, d, k = BIG
        cfgs = GPU_CFGS
        precs = ["ieee", "tf32", "bf16"]
        n_q_merge = 2048  # the simple variant merges on most tiles: timed on fewer queries
    gen = torch.Generator().manual_seed(1)
    q32 = torch.randn(n_q, d, generator=gen).to(device)
    k32 = torch.randn(n_k, d, generator=gen).to(device)
    for prec in precs:
        dt, allow_tf32, _ = PRECS[prec]
        q, kk = q32.to(dt), k32.to(dt)
        shape = f"n_q={n_q},n_k={n_k},d={d},k={k}"
        floor_ms = 2 * n_q * n_k * d / _mm_rate(device, dt, allow_tf32, smoke) * 1e3
        yield add_row(rows, {"op": OP, "shape": shape, "impl": f"matmul floor {prec}", "ms": floor_ms,
                             "note": "2*n_q*n_k*d / rate of an 8192^3 torch.mm"})
        with tf32(allow_tf32):
            ref_ms = time_ms(lambda: ref_topk(q, kk, k, *_no_excl(n_q, device)), device, warmup=1, reps=1)
            yield add_row(rows, {"op": OP, "shape": shape, "impl": f"eager reference {prec}", "ms": ref_ms})
            print("[row]", rows[-1], rows[-2], flush=True)
            for variant, p2, kw in cfgs:
                if p2 != prec:
                    continue
                nq = n_q if variant == "buffer" else n_q_merge
                qv = q[:nq]
                ex = _no_excl(nq, device)
                fn = (lambda kw=kw, variant=variant, qv=qv, ex=ex: tri.topk_scores(qv, kk, k, *ex, variant=variant, **kw))
                sh = f"n_q={nq},n_k={n_k},d={d},k={k}"
                try:
                    ms = time_ms(fn, device, warmup=1, reps=5, max_seconds=3)
                    ck = tri.LAST_LAUNCH.get("kernel")
                    cfg = tri.plan(nq, n_k, d, k, device, variant=variant, **kw)
                    scale = n_q / nq
                    note = (f"regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')} "
                            f"BM={cfg['BM']} BN={cfg['BN']} splits={cfg['splits']} warps={cfg['num_warps']}; "
                            f"{ref_ms / (ms * scale):.1f}x eager, floor/ms={floor_ms / (ms * scale):.2f}")
                    yield add_row(rows, {"op": OP, "shape": sh, "impl": f"triton {variant} {prec}", "ms": ms,
                                         "peak_MB": peak_extra_mb(fn, device), "note": note})
                    print("[row]", rows[-1], flush=True)
                except Exception as exc:  # noqa: BLE001
                    yield add_row(rows, {"op": OP, "shape": sh, "impl": f"triton {variant} {prec}", "ms": float("nan"),
                                         "note": _note(exc)})
    # torch.compile of the reference, fewer queries (it traces the Python tile loop); failing is reported
    n_c = min(n_q, 1024)
    qc = q32[:n_c]
    shape_c = f"n_q={n_c},n_k={n_k},d={d},k={k}"
    try:
        comp = torch.compile(ref_topk)
        c_ms = time_ms(lambda: comp(qc, k32, k, *_no_excl(n_c, device)), device, warmup=1, reps=2, max_seconds=5)
        e_ms = time_ms(lambda: ref_topk(qc, k32, k, *_no_excl(n_c, device)), device, warmup=1, reps=2)
        t_ms = time_ms(lambda: tri.topk_scores(qc, k32, k, *_no_excl(n_c, device)), device, warmup=1, reps=3)
        yield add_row(rows, {"op": OP, "shape": shape_c, "impl": "torch.compile reference ieee", "ms": c_ms,
                             "note": f"eager {e_ms:.4g} ms, triton buffer {t_ms:.4g} ms"})
    except Exception as exc:  # noqa: BLE001
        yield add_row(rows, {"op": OP, "shape": shape_c, "impl": "torch.compile reference ieee", "ms": float("nan"),
                             "note": "failed: " + _note(exc)})
    print("[row]", rows[-1], flush=True)


def _warm(spec):
    """Compile (and run once) one kernel configuration at the check shape: fills Triton's disk cache."""
    variant, prec = spec.split(":")[:2]
    kw = {"block_m": int(spec.split(":")[2])} if spec.count(":") == 2 else {}
    dt, allow_tf32, _ = PRECS[prec]
    device = torch.device("cuda")
    n_q, n_k, d, k = CHECK
    q = torch.randn(n_q, d, device=device).to(dt)
    kk = torch.randn(n_k, d, device=device).to(dt)
    excl = ragged_exclusions(n_q, n_k, 40, torch.Generator().manual_seed(0), device)
    import time
    t0 = time.perf_counter()
    with tf32(allow_tf32):
        tri.topk_scores(q, kk, k, *excl, variant=variant, **kw)
    torch.cuda.synchronize()
    ck = tri.LAST_LAUNCH.get("kernel")
    print(f"[warm] {spec}: {time.perf_counter() - t0:.1f} s, regs={getattr(ck, 'n_regs', '?')} "
          f"spills={getattr(ck, 'n_spills', '?')}", flush=True)


if __name__ == "__main__":
    import sys
    _warm(sys.argv[sys.argv.index("--warm") + 1])
