"""Compile every Triton kernel for an NVIDIA GPU on a machine without one, with the real compiler
(Triton -> TTGIR -> LLVM -> PTX -> ptxas), and report registers, spills and compile time per variant.

    python bench/compile_triton.py [--arch 90] [--out bench/results/compile_triton_sm90.md]

The Triton interpreter (the test suite) runs the kernels' Python semantics on the CPU; it does not run
the GPU code path (the `range` loops that the interpreter cannot take, the layouts, ptxas). This script
does, before any GPU time is spent: it drives the GPU checks of bench/gpu_*.py at their smoke shapes with
CPU tensors, but every kernel launch only compiles (Triton's warmup path) for the chosen architecture
through a stand-in driver, and float32 launches with PREC="ieee" are also compiled with "tf32". The
checks' numbers are meaningless here (nothing runs) and are not reported; compile errors are.
Registers and spills come from cuobjdump on each cubin (both ship with the triton wheel).
"""
from __future__ import annotations

import argparse
import contextlib
import io
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

from bench.common import load_note, markdown_table, write_result  # noqa: E402

COMPILED = []  # one dict per compiled variant


class _CompileOnlyDriver:
    """Enough of Triton's CUDA driver for compiling: a fixed target, device 0, no streams, no launches."""

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
    dtypes = ",".join(sorted({str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)
                              and a.dtype.is_floating_point}))
    entry = {"kernel": name, "variant": _spec(kwargs), "dtypes": dtypes, "compile s": seconds, "error": err or ""}
    if kernel is not None:
        entry.update(_resources(kernel))
    key = (entry["kernel"], entry["variant"], dtypes)
    if not any((e["kernel"], e["variant"], e["dtypes"]) == key for e in COMPILED):
        COMPILED.append(entry)
    return kernel


def _launcher(self, grid):
    def launch(*args, **kwargs):
        kernel = _compile(self, args, kwargs)
        if kwargs.get("PREC") == "ieee" and any(isinstance(a, torch.Tensor) and a.dtype == torch.float32
                                                for a in args):
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
        out = subprocess.run([os.path.join(_TOOLS, "cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    finally:
        os.unlink(path)
    found = {}
    for key, pat in (("regs", r"REG:(\d+)"), ("stack B", r"STACK:(\d+)"), ("shared B", r"SHARED:(\d+)"),
                     ("local B", r"LOCAL:(\d+)")):
        m = re.search(pat, out)
        if m:
            found[key] = int(m.group(1))
    return found


def _timing_topk(which=None):
    """The top-K kernel variants of the GPU timings, compiled at the check shape (n_q, n_k, d and the
    split chunk keep the same divisibility as the timing shapes, so the same kernels serve both)."""
    from bench import gpu_topk
    from kdfast.ops.topk import triton as tri

    g = torch.Generator().manual_seed(0)
    n_q, n_k, d, k = gpu_topk.CHECK
    for i, (variant, prec, kw) in enumerate(gpu_topk.GPU_CFGS):
        if which is not None and i != which:
            continue
        dt = gpu_topk.PRECS[prec][0]
        q, kk = torch.randn(n_q, d, generator=g).to(dt), torch.randn(n_k, d, generator=g).to(dt)
        tri.topk_scores(q, kk, k, *gpu_topk._no_excl(n_q, "cpu"), variant=variant, **kw)


def _timing_ops():
    """The other ops' kernel variants of the GPU timings: their constexprs depend on K, L, d and the tile
    plan, not on the row counts, so small row counts with the timing shapes' K, L, d compile them."""
    import kdfast

    def fwd_bwd(fn, *leaves):
        for x in leaves:
            x.requires_grad_()
        fn().sum().backward()

    for dt in (torch.float32, torch.bfloat16):
        s, u, t = torch.randn(64, 40).to(dt), torch.randn(64, 400).to(dt), torch.randn(64)
        fwd_bwd(lambda: kdfast.plackett_luce_loss(s, u, log_tail=t, backend="triton"), s, u)
        q, e = torch.randn(64, 64).to(dt), torch.randn(4096, 64).to(dt)
        ri, ui = torch.randint(0, 4096, (64, 40)), torch.randint(0, 4096, (64, 400))
        fwd_bwd(lambda: kdfast.plackett_luce_loss_from_embeddings(q, e, ri, ui, backend="triton"), q, e)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        q, e = torch.randn(64, 64), torch.randn(4096, 64)
        fwd_bwd(lambda: kdfast.plackett_luce_loss_from_embeddings(q, e, ri, ui, backend="triton"), q, e)
    finally:
        torch.use_deterministic_algorithms(before)
    indptr = torch.arange(0, 64 * 20 + 1, 20)
    excl = (indptr, torch.randint(0, 4096, (64 * 20,)))
    for dt in (torch.float32, torch.bfloat16):
        u, e = torch.randn(64, 64).to(dt), torch.randn(4096, 64).to(dt)
        ranked = torch.randint(0, 4096, (64, 50))
        fwd_bwd(lambda: kdfast.full_catalog_listwise_loss(u, e, ranked, exclude=excl, backend="triton"), u, e)
        fwd_bwd(lambda: kdfast.full_catalog_set_loss(u, e, ranked, exclude=excl, backend="triton"), u, e)
    t, s = torch.randn(512, 200), torch.randn(512, 20)
    fwd_bwd(lambda: kdfast.topology_loss(t, s, backend="triton"), s)
    groups = torch.randint(0, 30, (512,))
    for filt in (True, False):
        s = torch.randn(512, 20)
        fwd_bwd(lambda: kdfast.grouped_topology_loss(t, s, groups, 30, teacher_cos_filter=filt, backend="triton"), s)


CHECK_ITEMS = ["gpu_topk", "gpu_plackett_luce", "gpu_full_catalog", "gpu_topology"]


def work_items():
    """Every unit of work, each runnable alone (--only ITEM), e.g. by parallel processes."""
    from bench import gpu_topk
    return CHECK_ITEMS + ["timing_ops"] + [f"timing_topk:{i}" for i in range(len(gpu_topk.GPU_CFGS))]


def _run_item(item):
    import importlib
    if item in CHECK_ITEMS:  # the GPU checks at their smoke shapes (outputs are garbage: nothing runs)
        importlib.import_module(f"bench.{item}").checks("cpu", True)
    elif item == "timing_ops":
        _timing_ops()
    elif item.startswith("timing_topk"):
        _timing_topk(int(item.split(":")[1]) if ":" in item else None)
    else:
        raise SystemExit(f"unknown item {item!r}; known: {', '.join(work_items())}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--only", default="", help="comma-separated work items (default: all; see work_items())")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--list", action="store_true", help="print the work items and exit")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use Triton's usual disk cache (default: a fresh one, so that compile times are real)")
    args = ap.parse_args(argv)
    if args.list:
        print(" ".join(work_items()))
        return 0

    import kdfast
    from kdfast._core import backend as _backend

    triton.runtime.driver.set_active(_CompileOnlyDriver(args.arch))
    triton_jit.KernelInterface.__getitem__ = _launcher
    real_resolve = _backend.resolve
    _backend.resolve = lambda backend, device, **kw: ("triton" if backend == "triton"
                                                      else real_resolve(backend, device, **kw))
    kdfast._core.backend.resolve = _backend.resolve

    items = [n for n in args.only.split(",") if n] if args.only else work_items()
    problems = []
    t_all = time.perf_counter()
    for item in items:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                _run_item(item)
        except Exception as exc:  # noqa: BLE001 - the checks run on garbage outputs; only compiles matter
            problems.append(f"{item}: stopped at {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    total = time.perf_counter() - t_all
    errors = [e for e in COMPILED if e["error"]]
    header = (f"# Triton kernels compiled for sm_{args.arch} without a GPU\n\n"
              f"triton {triton.__version__}, torch {torch.__version__}; {len(COMPILED)} kernel variants "
              f"({len(errors)} failed) in {total:.0f} s, for: {', '.join(items)} (gpu_*: the smoke checks of "
              f"bench/gpu_*.py; timing_*: the K, L, d and tile plans of the GPU timings); registers and spills (stack/local bytes) "
              f"from cuobjdump; compile seconds with an empty cache, {load_note()}.\n\nCommand: `python bench/compile_triton.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n")
    table = markdown_table(COMPILED, ["kernel", "dtypes", "variant", "compile s", "regs", "stack B", "local B",
                                      "shared B", "error"])
    notes = "".join(f"\n- {p}" for p in problems)
    if not args.keep_cache:
        import shutil
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    text = header + table + (("\nWhere a check could not go on (its later kernels were not reached):" + notes + "\n")
                             if problems else "")
    write_result(args.out, text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
