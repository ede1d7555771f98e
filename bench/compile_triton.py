"""Compile every Triton kernel for an NVIDIA GPU on a machine without one, with the real compiler
(Triton -> TTGIR -> LLVM -> PTX -> ptxas), and report registers, spills and compile time per
variant.

    python bench/compile_triton.py [--arch 90] [--out bench/results/sm90-compile/compile_triton.md]

The Triton interpreter (the test suite) runs the kernels' Python semantics on the CPU; it does not
run the GPU code path (the `range` loops that the interpreter cannot take, the layouts, ptxas). This
script does, before any GPU time is spent: it drives the GPU checks of bench/ops/<op>.py at their
smoke shapes ("checks:<op>"), the K, L, d and tile plans of the GPU timings ("timing_*") and every
launch flag of every kernel per input dtype ("flags:<op>:<dtype>") with CPU tensors, but every
kernel launch only compiles (Triton's warmup path) for the chosen architecture through a stand-in
driver, and float32 launches with PREC="ieee" are also compiled with "tf32". The numbers computed
are meaningless here (nothing runs) and are not reported; compile errors are. Registers and spills
come from cuobjdump on each cubin (both ship with the triton wheel). `--list` prints the items of
the GPU run (bench/gpu.py --precompile compiles those), `--list-all` every item.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("unset TRITON_INTERPRET: this script compiles the GPU code path")
if "--keep-cache" not in sys.argv:  # compile times mean something only without Triton's disk cache
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdfast-triton-cache-")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from bench.harness import load_note, markdown_table, write_result  # noqa: E402
from bench.ops import OPS  # noqa: E402

COMPILED = []  # one dict per compiled variant


class _CompileOnlyDriver:
    """Enough of Triton's CUDA driver for compiling: a fixed target, device 0, no streams, no
    launches."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _spec(kwargs):
    keep = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
    return " ".join(f"{k}={v}" for k, v in sorted(keep.items()))


def _compile(fn, args, kwargs):
    t0 = time.perf_counter()
    err = None
    try:
        kernel = fn.run(*args, grid=None, warmup=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a compile error is a result
        kernel, err = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    seconds = time.perf_counter() - t0
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "?")
    dtypes = ",".join(
        sorted(
            {
                str(a.dtype).replace("torch.", "")
                for a in args
                if isinstance(a, torch.Tensor) and a.dtype.is_floating_point
            }
        )
    )
    entry = {
        "kernel": name,
        "variant": _spec(kwargs),
        "dtypes": dtypes,
        "compile s": seconds,
        "error": err or "",
    }
    if kernel is not None:
        entry.update(_resources(kernel))
    key = (entry["kernel"], entry["variant"], dtypes)
    if not any((e["kernel"], e["variant"], e["dtypes"]) == key for e in COMPILED):
        COMPILED.append(entry)
    return kernel


def _launcher(self, grid):
    def launch(*args, **kwargs):
        kernel = _compile(self, args, kwargs)
        if kwargs.get("PREC") == "ieee" and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args
        ):
            _compile(self, args, {**kwargs, "PREC": "tf32"})
        return kernel

    return launch


_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _resources(kernel):
    cubin = kernel.asm.get("cubin") if hasattr(kernel, "asm") else None
    if not cubin:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run(
            [os.path.join(_TOOLS, "cuobjdump"), "-res-usage", path],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    finally:
        os.unlink(path)
    found = {}
    for key, pat in (
        ("regs", r"REG:(\d+)"),
        ("stack B", r"STACK:(\d+)"),
        ("shared B", r"SHARED:(\d+)"),
        ("local B", r"LOCAL:(\d+)"),
    ):
        m = re.search(pat, out)
        if m:
            found[key] = int(m.group(1))
    return found


def _timing_topk(which=None):
    """The top-K kernel variants of the GPU timings, compiled at the check shape (n_q, n_k, d and
    the split chunk keep the same divisibility as the timing shapes, so the same kernels serve
    both)."""
    from bench.ops import topk
    from kdfast.ops.topk import triton as tri

    g = torch.Generator().manual_seed(0)
    n_q, n_k, d, k = topk.CHECK
    for i, (variant, prec, kw) in enumerate(topk.GPU_CFGS):
        if which is not None and i != which:
            continue
        dt = topk.PRECS[prec][0]
        q, kk = torch.randn(n_q, d, generator=g).to(dt), torch.randn(n_k, d, generator=g).to(dt)
        tri.topk_scores(q, kk, k, *topk.no_exclusions(n_q, "cpu"), variant=variant, **kw)


def _fwd_bwd(op, *args, leaves=(), grad=True, **kwargs):
    """op(*args, backend="triton", **kwargs) (a loss), and its backward when grad: the leaves
    require grad exactly then."""
    for x in leaves:
        x.requires_grad_(grad)
    out = op(*args, backend="triton", **kwargs)
    if grad:
        out.sum().backward()


@contextlib.contextmanager
def _deterministic(on):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _timing_ops():
    """The other ops' kernel variants of the GPU timings: their constexprs depend on K, L, d and the
    tile plan, not on the row counts, so small row counts with the timing shapes' K, L, d compile
    them."""
    import kdfast

    for dt in (torch.float32, torch.bfloat16):
        s, u, t = torch.randn(64, 40).to(dt), torch.randn(64, 400).to(dt), torch.randn(64)
        _fwd_bwd(kdfast.plackett_luce_loss, s, u, log_tail=t, leaves=(s, u))
        q, e = torch.randn(64, 64).to(dt), torch.randn(4096, 64).to(dt)
        ri, ui = torch.randint(0, 4096, (64, 40)), torch.randint(0, 4096, (64, 400))
        _fwd_bwd(kdfast.plackett_luce_loss_from_embeddings, q, e, ri, ui, leaves=(q, e))
    with _deterministic(True):
        q, e = torch.randn(64, 64), torch.randn(4096, 64)
        _fwd_bwd(kdfast.plackett_luce_loss_from_embeddings, q, e, ri, ui, leaves=(q, e))
    indptr = torch.arange(0, 64 * 20 + 1, 20)
    excl = (indptr, torch.randint(0, 4096, (64 * 20,)))
    for dt in (torch.float32, torch.bfloat16):
        u, e = torch.randn(64, 64).to(dt), torch.randn(4096, 64).to(dt)
        ranked = torch.randint(0, 4096, (64, 50))
        for op in (kdfast.full_catalog_listwise_loss, kdfast.full_catalog_set_loss):
            _fwd_bwd(op, u, e, ranked, exclude=excl, leaves=(u, e))
    t, s = torch.randn(512, 200), torch.randn(512, 20)
    _fwd_bwd(kdfast.topology_loss, t, s, leaves=(s,))
    groups = torch.randint(0, 30, (512,))
    for filt in (True, False):
        s = torch.randn(512, 20)
        _fwd_bwd(
            kdfast.grouped_topology_loss, t, s, groups, 30, teacher_cos_filter=filt, leaves=(s,)
        )
    from bench.ops import rank_of_ids

    for dt in (torch.float32, torch.bfloat16):
        rank_of_ids.compile_variants(dt)


# Every launch flag of every kernel, per op and input dtype: what the library can launch, beyond the
# shapes of the checks and timings (the tile sizes still follow the shapes: these use the timing K,
# L, d).
FLAG_DTYPES = {
    "topk": ("float32", "bfloat16", "float16"),  # float64 is rounded to float32 first
    "plackett_luce": ("float32", "bfloat16", "float16", "float64"),
    "full_catalog": ("float32", "bfloat16", "float16", "float64"),
    "topology": ("float32", "bfloat16", "float16", "float64"),
    "rank_of_ids": ("float32", "bfloat16", "float16"),  # float64 is rounded to float32 first
}


def _flags_topk(dt):
    from kdfast.ops.topk import triton as tri

    q, kk = torch.randn(64, 64).to(dt), torch.randn(4096, 64).to(dt)
    excl = (torch.arange(65) * 3, torch.randint(0, 4096, (64 * 3,)))
    for variant in tri.VARIANTS:
        tri.topk_scores(q, kk, 100, *excl, variant=variant)


def _flags_plackett_luce(dt):
    """Both forms with and without the unranked list and the log-tail, with and without gradients;
    the embedding form's backward with atomics and in deterministic mode."""
    import kdfast

    B, K, L, N, d = 64, 40, 400, 4096, 64
    for has_u, has_t, grad in itertools.product((True, False), repeat=3):
        s = torch.randn(B, K).to(dt)
        u = torch.randn(B, L).to(dt) if has_u else None
        t = torch.randn(B).to(dt) if has_t else None
        _fwd_bwd(kdfast.plackett_luce_loss, s, u, log_tail=t, leaves=(s,), grad=grad)
        for deterministic in (False, True) if grad else (False,):
            q, e = torch.randn(B, d).to(dt), torch.randn(N, d).to(dt)
            ri = torch.randint(0, N, (B, K))
            ui = torch.randint(0, N, (B, L)) if has_u else None
            with _deterministic(deterministic):
                _fwd_bwd(
                    kdfast.plackett_luce_loss_from_embeddings,
                    q,
                    e,
                    ri,
                    ui,
                    log_tail=t,
                    leaves=(q, e),
                    grad=grad,
                )


def _flags_full_catalog(dt):
    import kdfast

    u, e = torch.randn(64, 64).to(dt), torch.randn(4096, 64).to(dt)
    ranked = torch.randint(0, 4096, (64, 50))
    excl = (torch.arange(65) * 20, torch.randint(0, 4096, (64 * 20,)))
    for op in (kdfast.full_catalog_listwise_loss, kdfast.full_catalog_set_loss):
        for grad, clamp in ((True, None), (False, 40.0)):
            _fwd_bwd(op, u, e, ranked, exclude=excl, clamp=clamp, leaves=(u, e), grad=grad)


def _flags_topology(dt):
    """FTD with each combination of teacher and student gradients; HTD with the filter on and off,
    with and without the student gradient, through per-group Grams and (K=300 groups of d_pad=256
    columns exceed the Grams' budget) through the tiled kernel."""
    import kdfast

    t, s = torch.randn(512, 200).to(dt), torch.randn(512, 20).to(dt)
    for grad_t, grad_s in itertools.product((True, False), repeat=2):
        t.requires_grad_(grad_t)
        s.requires_grad_(grad_s)
        loss = kdfast.topology_loss(t, s, backend="triton")
        if grad_t or grad_s:
            loss.backward()
    for k in (30, 300):
        groups = torch.randint(0, k, (1024 if k > 30 else 512,))
        tt = torch.randn(groups.shape[0], 200).to(dt)
        for filt, grad in itertools.product((True, False), repeat=2):
            ss = torch.randn(groups.shape[0], 20).to(dt)
            _fwd_bwd(
                kdfast.grouped_topology_loss,
                tt,
                ss,
                groups,
                k,
                teacher_cos_filter=filt,
                leaves=(ss,),
                grad=grad,
            )


def _flags_rank_of_ids(dt):
    from bench.ops import rank_of_ids

    rank_of_ids.compile_variants(dt)


FLAGS = {
    "topk": _flags_topk,
    "plackett_luce": _flags_plackett_luce,
    "full_catalog": _flags_full_catalog,
    "topology": _flags_topology,
    "rank_of_ids": _flags_rank_of_ids,
}
CHECK_ITEMS = [f"checks:{op}" for op in OPS]


def work_items(run_only=False):
    """Every unit of work, each runnable alone (--only ITEM), e.g. by parallel processes. run_only:
    those of the GPU run (its checks and timings), without the flag sweeps."""
    from bench.ops import topk

    items = CHECK_ITEMS + ["timing_ops"] + [f"timing_topk:{i}" for i in range(len(topk.GPU_CFGS))]
    if not run_only:
        items += [f"flags:{op}:{dt}" for op, dts in FLAG_DTYPES.items() for dt in dts]
    return items


def _run_item(item):
    import importlib

    kind, _, rest = item.partition(":")
    if (
        kind == "checks" and rest in OPS
    ):  # the GPU checks at their smoke shapes (outputs are garbage: nothing runs)
        importlib.import_module(f"bench.ops.{rest}").checks("cpu", True)
    elif item == "timing_ops":
        _timing_ops()
    elif kind == "timing_topk":
        _timing_topk(int(rest) if rest else None)
    elif kind == "flags" and rest.partition(":")[0] in FLAGS:
        op, _, dt = rest.partition(":")
        FLAGS[op](getattr(torch, dt or "float32"))
    else:
        raise SystemExit(f"unknown item {item!r}; known: {', '.join(work_items())}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument(
        "--only", default="", help="comma-separated work items (default: all; see work_items())"
    )
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--list", action="store_true", help="print the GPU run's work items and exit")
    ap.add_argument("--list-all", action="store_true", help="print every work item and exit")
    ap.add_argument(
        "--keep-cache",
        action="store_true",
        help="use Triton's usual disk cache (default: a fresh one, so that compile times are real)",
    )
    args = ap.parse_args(argv)
    if args.list or args.list_all:
        print(" ".join(work_items(run_only=args.list)))
        return 0

    import kdfast
    from kdfast._core import backend as _backend

    triton.runtime.driver.set_active(_CompileOnlyDriver(args.arch))
    triton_jit.KernelInterface.__getitem__ = _launcher
    real_resolve = _backend.resolve
    _backend.resolve = lambda backend, device, **kw: (
        "triton" if backend == "triton" else real_resolve(backend, device, **kw)
    )
    kdfast._core.backend.resolve = _backend.resolve

    items = [n for n in args.only.split(",") if n] if args.only else work_items()
    problems = []
    t_all = time.perf_counter()
    for item in items:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                _run_item(item)
        except Exception as exc:  # noqa: BLE001 - the checks run on garbage outputs; only compiles matter
            problems.append(
                f"{item}: stopped at {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            )
    total = time.perf_counter() - t_all
    errors = [e for e in COMPILED if e["error"]]
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"# Triton kernels compiled for sm_{args.arch} without a GPU\n\n"
        f"triton {triton.__version__}, torch {torch.__version__}; {len(COMPILED)} kernel variants "
        f"({len(errors)} failed) in {total:.0f} s, for: {', '.join(items)} (checks:*: the smoke "
        "checks of bench/ops/*.py; timing_*: the K, L, d and tile plans of the GPU timings; "
        "flags:*: every launch flag per input dtype); registers and spills (stack/local bytes) "
        "from cuobjdump; "
        f"compile seconds with an empty cache, {load_note()}.\n\n"
        f"Command: `python bench/compile_triton.py {command}`\n\n"
    )
    table = markdown_table(
        COMPILED,
        [
            "kernel",
            "dtypes",
            "variant",
            "compile s",
            "regs",
            "stack B",
            "local B",
            "shared B",
            "error",
        ],
    )
    notes = "".join(f"\n- {p}" for p in problems)
    if not args.keep_cache:
        import shutil

        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    text = (
        header
        + table
        + (
            ("\nWhere a check could not go on (its later kernels were not reached):" + notes + "\n")
            if problems
            else ""
        )
    )
    write_result(args.out, text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
