"""Which backends are usable here, and the choice of backend for one call.

Three backends implement every hot op, and a fourth the CPU hot paths:
  "torch"  - the pure-PyTorch reference of the op (kdfast/ops/<op>/reference.py); always available.
  "cpp"    - the C++/OpenMP kernels of the optional extension kdfast._C; float32/float64 CPU
             tensors.
  "triton" - the Triton kernels (kdfast/ops/<op>/triton.py); CUDA tensors, or CPU tensors when
             TRITON_INTERPRET=1 (the Triton interpreter, slow: for tests).
  "numba"  - numba-compiled CPU kernels (kdfast/ops/<op>/numba.py: topk_scores and the
             Plackett-Luce losses) for where the extension cannot be built; float32/float64 CPU
             tensors; usable when numba imports (pip install 'kdfast[numba]').
`backend="auto"` picks triton for CUDA tensors and, for CPU tensors, cpp, then numba (an op that
has it, when the extension is missing), then torch; the environment variable KDFAST_BACKEND, when
set, replaces "auto". This module is the only reader of KDFAST_BACKEND (the samplers resolve their
backend here too), and the only place that configures numba's threads (numba_launch).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading

import torch

BACKENDS = ("torch", "cpp", "triton", "numba")
NAMES = ("auto",) + BACKENDS
# dtypes the C++ (and numba) kernels take; float16/bfloat16 are GPU dtypes
CPP_DTYPES = (torch.float32, torch.float64)
# numba's threading layers that load no OpenMP runtime of their own: torch's libgomp must stay the
# only one in the process (numba's "omp" layer links a second libgomp)
NUMBA_LAYERS = ("tbb", "workqueue")


@functools.cache
def _load_ext():
    try:
        return importlib.import_module("kdfast._C"), None
    except ImportError as exc:  # not built, or built for another Python
        return None, (
            f"the C++ extension kdfast._C is not importable ({exc}); reinstall kdfast with a C++17 "
            "compiler and OpenMP available (pip install -e . shows the build log)"
        )


def ext():
    """The compiled extension module kdfast._C, or None."""
    return _load_ext()[0]


def require_ext():
    """The compiled extension module kdfast._C; RuntimeError saying how to get it when it is
    missing."""
    mod, why = _load_ext()
    if mod is None:
        raise RuntimeError(f"backend='cpp' is not available: {why}")
    return mod


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import():
    try:
        import triton  # noqa: F401

        return True, None
    except ImportError as exc:
        return False, f"triton is not importable ({exc}); pip install 'kdfast[triton]'"


def _triton_status():
    ok, why = _triton_import()
    if not ok:
        return False, why
    if interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name(0)}"
    return (
        False,
        "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the slow interpreter)",
    )


@functools.cache
def _numba_import():
    try:
        return importlib.import_module("numba"), None
    except ImportError as exc:
        return None, f"numba is not importable ({exc}); pip install 'kdfast[numba]'"


def _numba_layer(numba):
    """(the threading layer numba uses or will use, None when it is fine; else why it is not)."""
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        layer = parallel._threading_layer
    else:
        layer = str(numba.config.THREADING_LAYER).lower()
        if layer == "default":
            # tbb when it is installed, else workqueue (which always loads): never omp
            numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]
            return "tbb" if importlib.util.find_spec("tbb") else "workqueue", None
        if layer == "forksafe":  # on Linux: tbb, else workqueue
            return layer, None
    if layer in NUMBA_LAYERS or layer == "safe":
        return layer, None
    return layer, (
        f"numba's threading layer is {layer!r}, which would load a second OpenMP runtime next to "
        "torch's; set NUMBA_THREADING_LAYER=workqueue (or tbb) before numba starts its threads"
    )


def _numba_status():
    numba, why = _numba_import()
    if numba is None:
        return False, why
    layer, why = _numba_layer(numba)
    if why is not None:
        return False, why
    return True, f"numba {numba.__version__} (threading layer {layer})"


def require_numba():
    """The numba module, its threading layer set to one without OpenMP; RuntimeError saying how to
    get it when it cannot run here."""
    ok, why = _numba_status()
    if not ok:
        raise RuntimeError(f"backend='numba' is not available: {why}")
    return _numba_import()[0]


# The workqueue layer takes one parallel launch at a time per process (a second, concurrent one from
# another Python thread would end the process): numba kernels launch under this lock.
_NUMBA_LOCK = threading.Lock()


@contextlib.contextmanager
def numba_launch():
    """Runs the block's numba kernel launches one at a time, on num_threads() threads (at most
    numba's NUMBA_NUM_THREADS, the size of its pool); RuntimeError, before any launch, if numba
    started its threads on a layer with OpenMP after all."""
    numba = require_numba()
    with _NUMBA_LOCK:
        numba.set_num_threads(min(num_threads(), numba.config.NUMBA_NUM_THREADS))  # starts them
        layer = numba.threading_layer()
        if layer not in NUMBA_LAYERS:
            raise RuntimeError(
                f"numba runs on the {layer!r} threading layer (a second OpenMP runtime next to "
                "torch's); set NUMBA_THREADING_LAYER=workqueue before numba starts its threads"
            )
        yield


def backends() -> dict:
    """Which backends are usable in this process, and why (or why not).

    Returns {"torch": (True, reason), "cpp": (bool, reason), "triton": (bool, reason), "numba":
    (bool, reason)}.
    """
    mod, why = _load_ext()
    if mod is not None:
        cpp = (
            True,
            f"C++ extension loaded (OpenMP {'on' if getattr(mod, 'openmp', False) else 'off'})",
        )
    else:
        cpp = (False, why)
    return {
        "torch": (True, "pure PyTorch reference, always available"),
        "cpp": cpp,
        "triton": _triton_status(),
        "numba": _numba_status(),
    }


def _requested(backend) -> str:
    """The backend name asked for, with KDFAST_BACKEND standing in for "auto"."""
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("KDFAST_BACKEND", "").strip()
        if env and env != "auto":
            if env not in NAMES:
                raise ValueError(f"KDFAST_BACKEND must be one of {NAMES}, got {env!r}")
            return env
    return backend


def _cpu_dtype(backend, dtype):
    if dtype is not None and dtype not in CPP_DTYPES:
        raise TypeError(
            f"backend='{backend}' takes float32 or float64 tensors, got {dtype} "
            "(float16/bfloat16 run on the triton and torch backends)"
        )


def resolve(backend: str, device, *, available=BACKENDS, dtype: torch.dtype | None = None) -> str:
    """The concrete backend ("torch", "cpp", "triton" or "numba") for one call on tensors of
    `device` and `dtype`.

    available: the backends the op has (an op or a sampler may lack one). dtype: the floating dtype
    of the call's tensors, when it matters (the cpp and numba kernels take float32 and float64
    only). "auto" (or KDFAST_BACKEND) picks triton on CUDA; on the CPU cpp, then numba when the
    extension is missing, and torch where none can run; KDFAST_BACKEND naming a backend the op
    lacks counts as "auto". Raises ValueError for an unknown name, RuntimeError saying how to get it
    when an explicitly requested backend cannot run here, TypeError when it cannot take `dtype`.
    """
    device = torch.device(device)
    requested = _requested(backend)
    if requested != backend and requested not in available:
        requested = "auto"  # KDFAST_BACKEND names a backend this op lacks: its automatic choice
    backend = requested
    if backend == "auto":
        if device.type == "cuda" and "triton" in available and _triton_import()[0]:
            return "triton"
        if device.type == "cpu" and (dtype is None or dtype in CPP_DTYPES):
            if "cpp" in available and ext() is not None:
                return "cpp"
            if "numba" in available and _numba_status()[0]:
                return "numba"
        return "torch"
    if backend not in available:
        raise RuntimeError(f"this op has no {backend} backend; use backend='torch' or 'auto'")
    if backend == "torch":
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        require_ext()
        _cpu_dtype("cpp", dtype)
        return "cpp"
    if backend == "numba":
        if device.type != "cpu":
            raise RuntimeError(f"backend='numba' runs on CPU tensors, got tensors on {device}")
        require_numba()
        _cpu_dtype("numba", dtype)
        return "numba"
    ok, why = _triton_import()
    if not ok:
        raise RuntimeError(f"backend='triton' is not available: {why}")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before kdfast is "
            "imported, to run the interpreter on CPU tensors)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' does not run on {device}")
    return "triton"


@torch.compiler.assume_constant_result
def choose(backend: str, device_type: str, dtype: torch.dtype | None, available: tuple) -> str:
    """resolve() for the ops, evaluated once at trace time under torch.compile: the choice depends
    on the environment, not on tensor data, and resolution imports the extension (untraceable)."""
    return resolve(backend, torch.device(device_type), available=available, dtype=dtype)


def num_threads() -> int:
    """Threads for the C++ and numba kernels: the same as PyTorch's intra-op setting."""
    return max(1, torch.get_num_threads())
