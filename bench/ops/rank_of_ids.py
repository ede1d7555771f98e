"""kdfast.rank_of_ids: benchmark cases and providers, the GPU checks of the Triton backend, and the
DCD rank step before/after (`python -m bench.ops.rank_of_ids --dcd`).

Providers: kdfast on the device's backend (CPU: cpp, and cpp with max_rank=200 as DCD calls it;
GPU: the Triton kernel, default tiles and two other tilings), the eager reference (torch, tiled,
two passes), and the naive dense form: the full score rows of a block of queries (one matmul),
rank-encoded, each given key compared with every key ([rows, m, n_k] comparisons), excluded keys
masked; on the large cases it is timed on the first rows and scaled (its note says so).

Cases: ids "random" (uniform over the keys: an untrained student's ranks of the teacher's items,
the costly case: every score lies between the lowest and the highest given score) and "near-top"
(100 of the 300 best keys of a perturbed query: a trained student's ranks, most scores below every
given one).

Checks: fresh random inputs against the reference (users.dat-like ragged exclusions, NaN keys,
padding and excluded ids): integer-valued embeddings (many exact ties) must match exactly in
float32, bfloat16 and float16 (and TF32); Gaussian ones up to float32 near-ties (share of equal
ranks >= 0.999, no rank off by more than 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from types import SimpleNamespace

import torch

import kdfast
from bench.harness import Bench, Provider, Step, non_finite_row, poison_cuda_cache, tf32, with_tf32
from bench.ops.topk import ragged_exclusions
from kdfast._core.csr import as_csr, row_ids
from kdfast._core.numerics import EMPTY, acc_dtype, encode_rank_keys
from kdfast.ops.rank_of_ids.reference import rank_of_ids as ref_rank

OP = "rank_of_ids"


def _tri():
    return importlib.import_module("kdfast.ops.rank_of_ids.triton")  # reads TRITON_INTERPRET


def dense_ranks(q, keys, ids, indptr, indices, rows=64):
    """The naive form: score rows of `rows` queries at once (matmul), rank keys, compare each given
    key with every key; excluded keys masked. Memory: rows x m x n_k booleans."""
    n_q, n_k = q.shape[0], keys.shape[0]
    dt = acc_dtype(q.dtype)
    kk = keys.to(dt)
    out = torch.empty(ids.shape, dtype=torch.int64, device=q.device)
    r_all = row_ids(indptr)
    cols = torch.arange(n_k, device=q.device)
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        key = encode_rank_keys(q[r0:r1].to(dt) @ kk.T, cols)
        lo, hi = int(indptr[r0]), int(indptr[r1])
        key[r_all[lo:hi] - r0, indices[lo:hi]] = EMPTY
        idb = ids[r0:r1]
        tk = encode_rank_keys(
            torch.gather(q[r0:r1].to(dt) @ kk.T, 1, idb.clamp_min(0)), idb.clamp_min(0)
        )
        cnt = (key[:, None, :] > tk[:, :, None]).sum(-1)
        out[r0:r1] = torch.where(idb >= 0, cnt, -1)
    return out


# ------------------------------------------------------------------------------------------ checks
PRECS = {
    "ieee": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}
CHECK = (2000, 50000, 64, 100)  # n_q, n_k, d, m
# launch options of the GPU checks and timings besides the default (sm_90 compile: 4 warps spill
# 16-40 B of 255 registers at the default tiles; block_m=64 or block_n=64 spill over 1 KB)
GPU_TILES = [{}, {"block_m": 16}, {"num_warps": 4}]


def _inputs_for_check(n_q, n_k, d, m, gen, integer, device, dt):
    if integer:
        q = torch.randint(-2, 3, (n_q, d), generator=gen).float()
        kk = torch.randint(-2, 3, (n_k, d), generator=gen).float()
    else:
        q, kk = torch.randn(n_q, d, generator=gen), torch.randn(n_k, d, generator=gen)
    kk[torch.randint(0, n_k, (max(1, n_k // 2000),), generator=gen)] = float("nan")
    ids = torch.randint(0, n_k, (n_q, m), generator=gen)
    ids[:, 1::7] = -1
    excl = ragged_exclusions(n_q, n_k, 5 if n_k < 1000 else 40, gen, "cpu")
    if excl[1].numel():
        ids[0, 0] = excl[1][0]  # an excluded id
    return (
        q.to(dt).to(device),
        kk.to(dt).to(device),
        ids.to(device),
        tuple(t.to(device) for t in excl),
    )


def _compare(got, want, exact):
    if got.shape != want.shape or got.dtype != torch.int64:
        return f"shape/dtype {tuple(got.shape)} {got.dtype}"
    if not torch.equal(got == -1, want == -1):
        return "padding slots differ"
    if exact:
        n = int((got != want).sum())
        return f"ranks differ in {n} slots (exact scores must match exactly)" if n else ""
    agree = float((got == want).double().mean())
    off = int((got - want).abs().max())
    return "" if agree >= 0.999 and off <= 2 else f"agreement {agree:.5f}, max |diff| {off}"


def checks(device, smoke):
    out = []
    tri = _tri()
    gen = torch.Generator().manual_seed(0)
    if smoke:
        shape = (5, 70, 8, 10)
        tiles = [{"block_m": 16, "block_n": 16, "block_t": 4}, {"block_m": 16, "block_n": 32}]
    else:
        shape, tiles = CHECK, GPU_TILES
    for integer in (True, False):
        for prec, (dt, allow_tf32) in PRECS.items():
            if (not integer and prec != "ieee") or (smoke and prec == "bf16"):
                continue  # (the interpreter's bfloat16 tl.dot is not IEEE: topk's gives the same)
            q, kk, ids, excl = _inputs_for_check(*shape, gen, integer, device, dt)
            ip, ix = as_csr(excl, "exclude", q.shape[0], kk.shape[0])
            with tf32(allow_tf32):
                want = ref_rank(q.float(), kk.float(), ids, ip, ix)
                for kw in tiles:
                    poison_cuda_cache(device)
                    try:
                        got = tri.rank_of_ids(q, kk, ids, ip, ix, **kw)
                        why = _compare(got, want, exact=integer)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        why = f"{type(exc).__name__}: {str(exc)[:300]}"
                    name = f"{prec} {'integer ties' if integer else 'Gaussian'} {kw or 'default'}"
                    out.append({"op": OP, "case": name, "ok": not why, "detail": why})
    out.append(non_finite_row(OP, "non-finite scores rank as -inf", lambda: _non_finite(device)))
    out += _score_function_checks(device, smoke)
    return out


def _non_finite(device):
    """Ranks where float32 products overflow, meet inf - inf or a NaN: every non-finite score ranks
    as -inf (ties by index), against the torch backend."""
    keys = torch.zeros(40, 32)
    keys[3, :16], keys[3, 16:] = 3e38, -3e38
    keys[5], keys[7, 0], keys[9, 0], keys[11, 0] = 3e38, float("nan"), 1.0, -1.0
    q = torch.ones(2, 32)
    ids = torch.arange(40).expand(2, 40).contiguous()
    got = kdfast.rank_of_ids(q.to(device), keys.to(device), ids.to(device), backend="triton")
    want = kdfast.rank_of_ids(q, keys, ids, backend="torch")
    return got.double(), want.double()


def _score_function_checks(device, smoke):
    """score="neg_sqeuclidean"/"cosine" with a key bias on the device's backend: integer inputs, so
    that the ranks must equal the torch backend's exactly."""
    device = torch.device(device)
    from kdfast._core.backend import interpreting

    backend = "triton" if device.type == "cuda" or interpreting() else "auto"
    gen = torch.Generator().manual_seed(7)
    n_q, n_k, d, m = (6, 50, 8, 12) if smoke else (1000, 50000, 64, 100)
    q = torch.randint(-2, 3, (n_q, d), generator=gen).float()
    kk = torch.randint(-2, 3, (n_k, d), generator=gen).float()
    bias = torch.randint(-3, 4, (n_k,), generator=gen).float()
    ids = torch.randint(0, n_k, (n_q, m), generator=gen)
    excl = ragged_exclusions(n_q, n_k, 3 if smoke else 40, gen, "cpu")
    rows = []
    for score in ("neg_sqeuclidean", "dot"):
        try:
            want = kdfast.rank_of_ids(
                q, kk, ids, exclude=excl, score=score, key_bias=bias, backend="torch"
            )
            got = kdfast.rank_of_ids(
                q.to(device),
                kk.to(device),
                ids.to(device),
                exclude=tuple(t.to(device) for t in excl),
                score=score,
                key_bias=bias.to(device),
                backend=backend,
            )
            why = "" if torch.equal(got.cpu(), want) else "ranks differ from the torch backend"
        except Exception as exc:  # noqa: BLE001
            why = str(exc)[:300]
        rows.append(
            {"op": OP, "case": f"score={score} + key_bias, integer", "ok": not why, "detail": why}
        )
    return rows


def compile_variants(dt):
    """Every launch flag of the Triton kernel for one input dtype (bench/compile_triton.py): the
    default tiles and GPU_TILES, with and without exclusions, at shapes with the divisibility of
    the GPU cases (CiteULike-like: n_q, n_k, d, m not multiples of 16; the others: n_q, n_k, d
    multiples of 16), so that the same compiled kernels serve the checks and timings."""
    tri = _tri()
    for n_q, n_k, d in ((67, 4099, 20), (64, 4096, 64)):
        q, kk = torch.randn(n_q, d).to(dt), torch.randn(n_k, d).to(dt)
        ids = torch.randint(0, n_k, (n_q, 100))
        for excl in (
            (torch.arange(n_q + 1) * 3, torch.randint(0, n_k, (n_q * 3,))),
            (torch.zeros(n_q + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
        ):
            for kw in GPU_TILES:
                tri.rank_of_ids(q, kk, ids, *excl, **kw)


# ------------------------------------------------------------------------------------- benchmarks
def _inputs(p, device):
    gen = torch.Generator().manual_seed(0)
    dt, allow_tf32 = PRECS[p.get("prec", "ieee")]
    n_q, n_k, d, m = p["n_q"], p["n_k"], p["d"], p["m"]
    q = (0.1 * torch.randn(n_q, d, generator=gen)).to(device, dt)
    keys = (0.1 * torch.randn(n_k, d, generator=gen)).to(device, dt)
    per = p.get("excl", 0)
    excl = (
        torch.arange(n_q + 1, dtype=torch.int64, device=device) * per,
        torch.randint(0, n_k, (n_q * per,), generator=gen).to(device),
    )
    if p.get("ids", "random") == "random":
        ids = torch.randint(0, n_k, (n_q, m), generator=gen).to(device)
    else:  # a trained student: m of the 300 best keys of a perturbed query
        noisy = q + 0.3 * q.std() * torch.randn(n_q, d, generator=gen).to(device, dt)
        _, top = kdfast.topk_scores(noisy, keys, 300, exclude=excl)
        cols = torch.randperm(300, generator=gen)[:m].to(device)
        ids = top[:, cols].contiguous()
    ip, ix = as_csr(excl, "exclude", n_q, n_k)
    return SimpleNamespace(
        q=q, keys=keys, ids=ids, excl=excl, ip=ip, ix=ix, tf32=allow_tf32, device=device
    )


def _label(p):
    excl = f", {p['excl']} excluded/query" if p.get("excl") else ""
    return (
        f"n_q={p['n_q']} n_k={p['n_k']} d={p['d']} m={p['m']} ids {p.get('ids', 'random')}"
        f"{excl} {p.get('prec', 'ieee')}"
    )


def _kdfast(x, p):
    fn = lambda: kdfast.rank_of_ids(x.q, x.keys, x.ids, exclude=x.excl, backend=p["backend"])  # noqa: E731
    return Step(with_tf32(x.tf32, fn), reps=5)


def _kdfast_capped(x, p):
    fn = lambda: kdfast.rank_of_ids(  # noqa: E731
        x.q, x.keys, x.ids, exclude=x.excl, max_rank=200, backend=p["backend"]
    )
    return Step(with_tf32(x.tf32, fn), reps=5)


def _reference(x, p):
    reps = 1 if x.device.type == "cuda" else 2
    return Step(with_tf32(x.tf32, lambda: ref_rank(x.q, x.keys, x.ids, x.ip, x.ix)), reps=reps)


def _dense(x, p):
    n = min(x.q.shape[0], p.get("dense_rows") or x.q.shape[0])
    ip, ix = x.ip[: n + 1], x.ix[: int(x.ip[n])]
    note = f"timed at n_q={n}, scaled x{x.q.shape[0] / n:g}" if n < x.q.shape[0] else ""
    fn = lambda: dense_ranks(x.q[:n], x.keys, x.ids[:n], ip, ix)  # noqa: E731
    return Step(
        with_tf32(x.tf32, fn),
        scale=x.q.shape[0] / n,
        note=note,
        reps=2,
        warmup=1,
        max_seconds=10,
    )


def _triton(**kw):
    def make(x, p):
        tri = _tri()
        args = dict(p.get("tiles", {}), **kw)
        fn = with_tf32(x.tf32, lambda: tri.rank_of_ids(x.q, x.keys, x.ids, x.ip, x.ix, **args))

        def launch_note():
            ck = tri.LAST_LAUNCH.get("kernel")
            return f"regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')}"

        return Step(fn, note=launch_note, reps=5, max_seconds=3)

    return make


_CITEULIKE = dict(n_q=5219, n_k=25181, d=20, m=100, excl=33)  # DCD's user side on CiteULike-t
RANK = Bench(
    op=OP,
    cases={
        "cpu": {
            "small": dict(n_q=1000, n_k=25181, d=20, m=100, excl=33),
            "large": dict(_CITEULIKE, dense_rows=512),
            "large-near-top": dict(_CITEULIKE, ids="near-top", dense_rows=512),
        },
        "cuda": {
            "small": dict(zip(("n_q", "n_k", "d", "m"), CHECK)),
            "large-citeulike": dict(_CITEULIKE),
            "large-citeulike-near-top": dict(_CITEULIKE, ids="near-top"),
            "large": dict(n_q=32768, n_k=2**20, d=64, m=100, excl=50, dense_rows=1024),
            "large-bf16": dict(n_q=32768, n_k=2**20, d=64, m=100, excl=50, prec="bf16"),
            "smoke": dict(
                n_q=16, n_k=300, d=16, m=8, tiles={"block_m": 16, "block_n": 16, "block_t": 4}
            ),
        },
    },
    inputs=_inputs,
    label=_label,
    providers=(
        Provider("eager reference", _reference),
        Provider("kdfast cpp", _kdfast, kinds=("cpu",)),
        Provider("kdfast cpp max_rank=200 (DCD)", _kdfast_capped, kinds=("cpu",), comparable=False),
        Provider("kdfast triton", _triton(), kinds=("cuda",)),
        Provider(
            "kdfast triton BM=16", _triton(**GPU_TILES[1]), kinds=("cuda",),
            when=lambda p: "tiles" not in p,
        ),
        Provider(
            "kdfast triton 4 warps", _triton(**GPU_TILES[2]), kinds=("cuda",),
            when=lambda p: "tiles" not in p,
        ),
        Provider("dense matmul + compare", _dense, when=lambda p: p.get("prec", "ieee") == "ieee"),
    ),
)  # fmt: skip
BENCHES = (RANK,)


def timings(device, smoke):
    from bench.harness import gpu_timings

    return gpu_timings(BENCHES, device, smoke)


# ------------------------------------------------------------------------ DCD's rank step, timed
def dcd_rank_step(n_users=5219, n_items=25181, d=20, n=100, eps=10.0, per_user=33, reps=3):
    """Seconds (wall, and CPU time of the process) of DCD's per-epoch student ranks (user side +
    item side, rank="catalog") on the CPU: before (kdfast.topk_scores with k = N + ceil(10 eps),
    then each teacher item's position) and after (kdfast.rank_of_ids with max_rank = that depth,
    as DCD calls it), on the same random inputs, for an untrained student (N(0, 0.01) tables) and
    a trained-like one (the teacher's tables projected on the d main directions of its item
    table); checks that both give the same ranks."""
    from kdfast.csr import transpose_csr
    from kdfast.methods.dcd import _depth, _positions

    gen = torch.Generator().manual_seed(0)
    indptr = torch.arange(n_users + 1, dtype=torch.int64) * per_user
    train = (indptr, torch.randint(0, n_items, (n_users * per_user,), generator=gen))
    excl_u = as_csr(train, "train", n_users, n_items, canonical=True)
    excl_i = transpose_csr(excl_u, n_items, n_users)
    tu, ti = torch.randn(n_users, 64, generator=gen), torch.randn(n_items, 64, generator=gen)
    _, t_top_u = kdfast.topk_scores(tu, ti, n, exclude=excl_u)
    _, t_top_i = kdfast.topk_scores(ti, tu, n, exclude=excl_i)
    # trained-like: both tables projected on the teacher items' d main directions
    proj = torch.linalg.svd(ti, full_matrices=False).Vh[:d].T
    trained_u, trained_i = (tu @ proj).contiguous(), (ti @ proj).contiguous()
    students = {
        "untrained N(0, 0.01)": (
            0.01 * torch.randn(n_users, d, generator=gen),
            0.01 * torch.randn(n_items, d, generator=gen),
        ),
        "trained-like (teacher projected to d)": (trained_u, trained_i),
    }
    rows = []
    for name, (su, si) in students.items():
        sides = ((su, si, t_top_u, excl_u, n_items), (si, su, t_top_i, excl_i, n_users))

        def before(sides=sides):
            out = []
            for q, k, cand, excl, n_ids in sides:
                depth = _depth(n, eps, n_ids)
                _, top = kdfast.topk_scores(q, k, depth, exclude=excl)
                out.append(_positions(top, cand, n_ids))
            return out

        def after(sides=sides):
            out = []
            for q, k, cand, excl, n_ids in sides:
                depth = _depth(n, eps, n_ids)
                full = kdfast.rank_of_ids(q, k, cand, exclude=excl, max_rank=depth)
                out.append(torch.where(cand >= 0, full, depth))
            return out

        for label, fn in (("before: topk_scores(depth) + positions", before),
                          ("after: rank_of_ids(max_rank=depth)", after)):  # fmt: skip
            wall, cpu = [], []
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                res = fn()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            med = len(wall) // 2
            rows.append((name, label, (sorted(wall)[med], sorted(cpu)[med]), res))
        same = all(torch.equal(a, b) for a, b in zip(rows[-2][3], rows[-1][3]))
        rows.append((name, "same ranks before and after", same, None))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="DCD's per-epoch rank step, before and after")
    ap.add_argument("--dcd", action="store_true", help="time DCD's rank step (CPU)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if not args.dcd:
        ap.print_help()
        return 0
    print(f"torch threads {torch.get_num_threads()}")
    print("| student | rank step | wall s (median) | CPU s of the process (median) |")
    print("|---|---|---|---|")
    for name, label, value, _ in dcd_rank_step(reps=args.reps):
        v = f"{value[0]:.3f} | {value[1]:.3f}" if isinstance(value, tuple) else f"{value} |"
        print(f"| {name} | {label} | {v} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
