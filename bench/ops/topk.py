"""kdfast.topk_scores: benchmark cases and providers, and the GPU checks of the Triton backend.

Providers: kdfast on the device's backend (CPU: kdfast.topk_scores, cpp, and numba where it imports;
GPU: the Triton backend's
variants, buffer and merge, timed directly to choose the variant and report registers and tiles),
the eager reference, torch.compile of it, and on the GPU the matmul floor 2*n_q*n_k*d / (rate of a
compute-bound 8192^3 torch.mm in the same precision, measured in the same run).

Checks: fresh random inputs (users.dat-like ragged exclusion rows, NaN keys, integer-valued
embeddings with many ties, k > n_k), float32 (IEEE and TF32), bfloat16, float16, both variants,
compared with the reference tie-aware: the same empty slots, no excluded or repeated index, and the
float64 scores of the chosen keys equal, position by position, those of the reference's keys (within
a rounding tolerance), so near-ties may swap but nothing else. Integer embeddings must match the
reference exactly.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

import kdfast
from bench.harness import (
    Bench,
    Provider,
    Step,
    floor_step,
    gpu_timings,
    matmul_rate,
    non_finite_row,
    poison_cuda_cache,
    tf32,
    with_tf32,
)
from kdfast.ops.topk.reference import topk_scores as ref_topk

OP = "topk_scores"


def _tri():
    return importlib.import_module(
        "kdfast.ops.topk.triton"
    )  # on first use: it reads TRITON_INTERPRET


def ragged_exclusions(n_q, n_k, mean, gen, device):
    """users.dat-like rows: lengths ~ lognormal (some empty, some long), ids uniform (repeats
    allowed)."""
    lengths = torch.exp(
        torch.randn(n_q, generator=gen) * 1.0 + float(torch.log(torch.tensor(mean)))
    ).long()
    lengths[::7] = 0
    lengths = lengths.clamp(max=n_k)
    indptr = torch.zeros(n_q + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(lengths, 0)
    ids = torch.randint(0, n_k, (int(indptr[-1]),), generator=gen)
    return indptr.to(device), ids.to(device)


def no_exclusions(n_q, device):
    return (
        torch.zeros(n_q + 1, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
    )


def compare(q, kk, excl, vals, idx, rvals, ridx, *, exact=False, tol=1e-5):
    """'' when (vals, idx) agree with the reference (rvals, ridx) tie-aware, else what differs."""
    if exact:
        if not torch.equal(idx, ridx):
            n = (idx != ridx).sum().item()
            return f"indices differ in {n} slots (integer scores must match exactly)"
        if not torch.equal(vals, rvals):
            return "values differ (integer scores must match exactly)"
        return ""
    if torch.isnan(vals).any():
        return "NaN in values"
    if not torch.equal(idx == -1, ridx == -1):
        n, n_ref = (idx == -1).sum().item(), (ridx == -1).sum().item()
        return f"empty slots differ: {n} vs reference {n_ref}"
    if not torch.equal(torch.isneginf(vals), torch.isneginf(rvals)):
        return "-inf slots differ"
    n_q, n_k = q.shape[0], kk.shape[0]
    valid = idx >= 0
    safe = idx.clamp(min=0)
    u = torch.where(valid, idx, -1 - torch.arange(idx.shape[1], device=idx.device))
    u = torch.sort(u, dim=1).values
    if (u[:, 1:] == u[:, :-1]).any():
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
    fin_out = torch.isfinite(e_out)
    vdiff = (
        ((vals.double() - e_out).abs() / scale).where(fin_out, torch.zeros_like(e_out)).max().item()
    )
    if vdiff > tol:
        return f"returned values differ from the chosen keys' scores by {vdiff:.3g} (rel.)"
    return ""


# Every GPU shape keeps n_q, n_k, d and the split chunk divisible by 16, so that one compiled kernel
# per (variant, dtype, precision) serves all of them (Triton specialises on divisibility):
# bench/compile_triton.py compiles GPU_CFGS at the CHECK shape, in parallel processes before
# bench/gpu.py's checks.
CHECK = (2000, 50000, 64, 100)
BIG = (32768, 2**20, 64, 100)
PRECS = {
    "ieee": (torch.float32, False, 1e-5),
    "tf32": (torch.float32, True, 3e-3),
    "bf16": (torch.bfloat16, False, 1e-5),
    "fp16": (torch.float16, False, 1e-5),
}
GPU_CFGS = [
    ("buffer", "ieee", {}),
    ("buffer", "tf32", {}),
    ("buffer", "bf16", {}),
    ("buffer", "fp16", {}),
    ("merge", "ieee", {}),
    ("merge", "bf16", {}),
    ("buffer", "bf16", {"block_m": 32}),
]


def checks(device, smoke):
    out = []
    tri = _tri()
    gen = torch.Generator().manual_seed(0)
    if smoke:
        cases = [("ragged-excl+NaN", 5, 70, 8, 10, 4), ("k>n_k", 3, 20, 8, 30, 0)]
        cfgs = [
            ("buffer", "ieee", {"block_m": 16, "block_n": 16}),
            ("merge", "ieee", {"block_m": 16}),
        ]
        n_int = (4, 60, 8, 12)
    else:
        cases = [("users.dat-like excl+NaN, split-K", *CHECK, 40)]
        cfgs = [c for c in GPU_CFGS if not c[2]]
        n_int = CHECK
    for name, n_q, n_k, d, k, mean_excl in cases:
        excl = (
            ragged_exclusions(n_q, n_k, mean_excl, gen, device)
            if mean_excl
            else no_exclusions(n_q, device)
        )
        for variant, prec, kw in cfgs:
            dt, allow_tf32, tol = PRECS[prec]
            q = torch.randn(n_q, d, generator=gen).to(device, dt)
            kk = torch.randn(n_k, d, generator=gen).to(device, dt)
            kk[torch.randint(0, n_k, (max(1, n_k // 2000),), generator=gen)] = float("nan")
            with tf32(allow_tf32):
                rv, ri = ref_topk(q, kk, k, *excl)
                poison_cuda_cache(device)
                try:
                    v, i = tri.topk_scores(q, kk, k, *excl, variant=variant, **kw)
                    why = compare(q, kk, excl, v, i, rv, ri, tol=tol)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    why = f"{type(exc).__name__}: {str(exc)[:300]}"
            out.append({"op": OP, "case": f"{variant} {prec} {name}", "ok": not why, "detail": why})
    # integer-valued embeddings: many exact ties; every precision must reproduce the reference
    # exactly
    n_q, n_k, d, k = n_int
    q = torch.randint(-2, 3, (n_q, d), generator=gen).float().to(device)
    kk = torch.randint(-2, 3, (n_k, d), generator=gen).float().to(device)
    excl = ragged_exclusions(n_q, n_k, 5 if smoke else 50, gen, device)
    rv, ri = ref_topk(q, kk, k, *excl)
    for variant, prec, kw in cfgs:
        dt, allow_tf32, _ = PRECS[prec]
        with tf32(allow_tf32):
            poison_cuda_cache(device)
            try:
                v, i = tri.topk_scores(q.to(dt), kk.to(dt), k, *excl, variant=variant, **kw)
                why = compare(q, kk, excl, v, i, rv, ri, exact=True)
            except Exception as exc:  # noqa: BLE001
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
        out.append(
            {"op": OP, "case": f"{variant} {prec} integer ties", "ok": not why, "detail": why}
        )
    out.append(non_finite_row(OP, "non-finite scores rank last", lambda: _non_finite(device)))
    out += _score_function_checks(device, smoke)
    return out


def _timed(fn, device):
    """(fn()'s result, its wall milliseconds on the device, synchronised)."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    r = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return r, 1e3 * (time.perf_counter() - t0)


def _score_function_checks(device, smoke):
    """topk_scores(score=..., key_bias=...) on the device's backend against the float64 oracle
    (integer inputs and biases: every score exact, so the order must be the oracle's exactly;
    Gaussian inputs for cosine: the same indices but where float32 near-ties swap), and
    topk_from_scorer with an MLP scorer on the device against a dense ranking. Fresh inputs, every
    output compared; the detail carries the call's time (first call, compile included)."""
    from kdfast.ops.topk import reference

    device = torch.device(device)
    from kdfast._core.backend import interpreting

    backend = "triton" if device.type == "cuda" or interpreting() else "auto"
    gen = torch.Generator().manual_seed(7)
    n_q, n_k, d, k = (6, 50, 8, 12) if smoke else (1000, 50000, 64, 100)
    rows = []

    def row(case, fn):
        try:
            why, ms = fn()
            rows.append({"op": OP, "case": case, "ok": not why, "detail": why or f"{ms:.1f} ms"})
        except Exception as exc:  # noqa: BLE001 - a failed check, not a failed run
            rows.append({"op": OP, "case": case, "ok": False, "detail": str(exc)[:300]})

    q = torch.randint(-2, 3, (n_q, d), generator=gen).float()
    kk = torch.randint(-2, 3, (n_k, d), generator=gen).float()
    bias = torch.randint(-3, 4, (n_k,), generator=gen).float()
    excl = ragged_exclusions(n_q, n_k, 3 if smoke else 40, gen, "cpu")
    for score in ("dot", "neg_sqeuclidean"):

        def exact(score=score):
            rv, ri = reference.topk_scores(
                q.double(), kk.double(), k, *excl, score=score, key_bias=bias.double()
            )
            (v, i), ms = _timed(
                lambda: kdfast.topk_scores(
                    q.to(device),
                    kk.to(device),
                    k,
                    exclude=tuple(t.to(device) for t in excl),
                    score=score,
                    key_bias=bias.to(device),
                    backend=backend,
                ),
                device,
            )
            same = torch.equal(i.cpu(), ri) and torch.equal(v.cpu(), rv)
            return ("" if same else "indices or values differ from the oracle"), ms

        row(f"score={score} + key_bias, integer ties", exact)
    qc, kc = torch.randn(n_q, d, generator=gen), torch.randn(n_k, d, generator=gen)

    def cosine():
        rv, ri = reference.topk_scores(qc.double(), kc.double(), k, *excl, score="cosine")
        (v, i), ms = _timed(
            lambda: kdfast.topk_scores(
                qc.to(device),
                kc.to(device),
                k,
                exclude=tuple(t.to(device) for t in excl),
                score="cosine",
                backend=backend,
            ),
            device,
        )
        agree = float((i.cpu() == ri).double().mean())
        err = float((v.cpu().double() - rv.double()).abs().max())
        ok = agree >= 0.999 and err <= 1e-5
        return ("" if ok else f"index agreement {agree:.4f}, max |value error| {err:.2e}"), ms

    row("score=cosine, Gaussian", cosine)
    n_u, n_i = (5, 300) if smoke else (2000, 20000)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(2 * d, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
    ).to(device)
    eu = torch.randn(n_u, d, generator=gen).to(device)
    ei = torch.randn(n_i, d, generator=gen).to(device)

    def pairs(u, i):
        a = eu[u][:, None, :].expand(-1, i.numel(), -1)
        b = ei[i][None, :, :].expand(u.numel(), -1, -1)
        return mlp(torch.cat([a, b], -1))[..., 0]

    def scorer():
        with torch.no_grad():
            dense = torch.cat(
                [
                    pairs(
                        torch.arange(u0, min(n_u, u0 + 64), device=device),
                        torch.arange(n_i, device=device),
                    )
                    for u0 in range(0, n_u, 64)
                ]
            )
        want = kdfast.topk_from_scorer(lambda u, i: dense[u][:, i], n_u, n_i, k, device=device)
        (v, i), ms = _timed(
            lambda: kdfast.topk_from_scorer(pairs, n_u, n_i, k, device=device), device
        )
        agree = float((i.cpu() == want[1].cpu()).double().mean())
        return ("" if agree >= 0.999 else f"index agreement {agree:.4f}"), ms

    row("topk_from_scorer, MLP scorer", scorer)
    return rows


def _non_finite(device):
    """Indices of a case whose float32 products overflow to +inf, to inf - inf, or meet a NaN: every
    non-finite score ranks as -inf (the rule of every backend), against the reference."""
    keys = torch.zeros(40, 32)
    keys[3, :16], keys[3, 16:] = 3e38, -3e38
    keys[5], keys[7, 0], keys[9, 0], keys[11, 0] = 3e38, float("nan"), 1.0, -1.0
    q = torch.ones(2, 32)
    _, i = kdfast.topk_scores(q.to(device), keys.to(device), 40, backend="triton")
    _, want = kdfast.topk_scores(q, keys, 40, backend="torch")
    return i.double(), want.double()


# ------------------------------------------------------------------------------------- benchmarks
def _inputs(p, device):
    gen = torch.Generator().manual_seed(0)
    dt, allow_tf32, _ = PRECS[p.get("prec", "ieee")]
    n_q, n_k, d = p["n_q"], p["n_k"], p["d"]
    q = torch.randn(n_q, d, generator=gen).to(device, dt)
    keys = torch.randn(n_k, d, generator=gen).to(device, dt)
    per = p.get("excl", 0)
    excl = (
        torch.arange(n_q + 1, dtype=torch.int64, device=device) * per,
        torch.randint(0, n_k, (n_q * per,), generator=gen).to(device),
    )
    return SimpleNamespace(
        q=q, keys=keys, k=p["k"], excl=excl, dtype=dt, tf32=allow_tf32, device=device
    )


def _label(p):
    excl = f", {p['excl']} excluded/query" if p.get("excl") else ""
    return f"n_q={p['n_q']} n_k={p['n_k']} d={p['d']} k={p['k']}{excl} {p.get('prec', 'ieee')}"


def _rows(x, n):
    """The first n queries (all of them for n None) and their exclusions, and the scale from them to
    the whole case, with the note that says so."""
    n_q = x.q.shape[0]
    n = min(n_q, n or n_q)
    per = int(x.excl[0][1]) if n_q else 0
    excl = (x.excl[0][: n + 1], x.excl[1][: n * per])
    note = f"timed at n_q={n}, scaled x{n_q / n:g}" if n < n_q else ""
    return x.q[:n], excl, n_q / n, note


def _kdfast(x, p):
    fn = lambda: kdfast.topk_scores(x.q, x.keys, x.k, exclude=x.excl, backend=p["backend"])  # noqa: E731
    return Step(with_tf32(x.tf32, fn), reps=5)


def _numba_usable(p):
    return kdfast.backends()["numba"][0]


def _kdfast_numba(x, p):
    return _kdfast(x, dict(p, backend="numba"))


def _reference(x, p):
    reps = 1 if x.device.type == "cuda" else 2
    return Step(with_tf32(x.tf32, lambda: ref_topk(x.q, x.keys, x.k, *x.excl)), reps=reps)


def _compiled(x, p):
    q, excl, scale, note = _rows(x, p.get("compile_rows"))
    comp = torch.compile(ref_topk)
    return Step(
        with_tf32(x.tf32, lambda: comp(q, x.keys, x.k, *excl)),
        scale=scale,
        note=note,
        reps=2,
        max_seconds=5 if x.device.type == "cuda" else 60,
    )


def _triton(variant, **kw):
    def make(x, p):
        tri = _tri()
        q, excl, scale, note = _rows(x, p.get("merge_rows") if variant == "merge" else None)
        args = dict(p.get("tiles", {}).get(variant, {}), **kw)
        fn = with_tf32(
            x.tf32, lambda: tri.topk_scores(q, x.keys, x.k, *excl, variant=variant, **args)
        )

        def launch_note():
            ck = tri.LAST_LAUNCH.get("kernel")
            cfg = tri.plan(
                q.shape[0], x.keys.shape[0], q.shape[1], x.k, x.device, variant=variant, **args
            )
            return (
                f"regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')} "
                f"BM={cfg['BM']} BN={cfg['BN']} splits={cfg['splits']} "
                f"warps={cfg['num_warps']}; {note}"
            ).rstrip("; ")

        return Step(fn, scale=scale, note=launch_note, reps=5, max_seconds=3)

    return make


def _matmul_floor(x, p):
    work = p["n_q"] * p["n_k"] * p["d"]
    return floor_step(
        matmul_rate(x.device, x.dtype, x.tf32), work, "2 n_q n_k d / rate of a square torch.mm"
    )


_SMOKE_TILES = {"buffer": {"block_m": 16, "block_n": 16}, "merge": {"block_m": 16}}
TOPK = Bench(
    op=OP,
    cases={
        "cpu": {
            "small": dict(n_q=2000, n_k=20000, d=64, k=100, excl=50),
            "large": dict(n_q=20000, n_k=100000, d=64, k=100, excl=50),
        },
        "cuda": {
            "small": dict(zip(("n_q", "n_k", "d", "k"), CHECK)),
            **{
                f"large{'' if prec == 'ieee' else '-' + prec}": dict(
                    zip(("n_q", "n_k", "d", "k"), BIG),
                    prec=prec,
                    merge_rows=2048,
                    compile_rows=1024,
                )
                for prec in ("ieee", "tf32", "bf16")
            },
            "smoke": dict(n_q=16, n_k=300, d=16, k=10, tiles=_SMOKE_TILES),
        },
    },
    inputs=_inputs,
    label=_label,
    providers=(
        Provider("matmul floor", _matmul_floor, kinds=("cuda",)),
        Provider("eager reference", _reference),
        Provider("kdfast cpp", _kdfast, kinds=("cpu",)),
        Provider("kdfast numba", _kdfast_numba, kinds=("cpu",), when=_numba_usable),
        Provider("kdfast triton buffer", _triton("buffer"), kinds=("cuda",)),
        Provider(
            "kdfast triton merge",
            _triton("merge"),
            kinds=("cuda",),
            when=lambda p: p.get("prec", "ieee") in ("ieee", "bf16"),
        ),
        Provider(
            "kdfast triton buffer block_m=32",
            _triton("buffer", block_m=32),
            kinds=("cuda",),
            when=lambda p: p.get("prec") == "bf16",
        ),
        Provider(
            "torch.compile(reference)", _compiled, when=lambda p: p.get("prec", "ieee") == "ieee"
        ),
    ),
)
BENCHES = (TOPK,)


def timings(device, smoke):
    return gpu_timings(BENCHES, device, smoke)
