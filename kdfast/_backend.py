"""Which backends are usable here, and the choice of backend for one call.

Three backends implement every hot op:
  "torch"  - the pure-PyTorch reference (kdfast/reference); always available, any device.
  "cpp"    - the C++/OpenMP kernels of the optional extension kdfast._C; CPU tensors.
  "triton" - the Triton kernels (kdfast/triton); CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
             (the Triton interpreter, slow: for tests).
`backend="auto"` picks triton for CUDA tensors and cpp for CPU tensors, falling back to torch; the
environment variable KDFAST_BACKEND, when set, replaces "auto".
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "cpp", "triton")


@functools.lru_cache(maxsize=None)
def _load_ext():
    try:
        return importlib.import_module("kdfast._C"), None
    except ImportError as exc:  # not built, or built for another Python
        return None, f"the C++ extension kdfast._C is not importable ({exc}); reinstall kdfast with a C++17 compiler and OpenMP available (pip install -e . shows the build log)"


def ext():
    """The compiled extension module kdfast._C, or None."""
    return _load_ext()[0]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
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
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the slow interpreter)"


def backends() -> dict:
    """Which backends are usable in this process, and why (or why not).

    Returns {"torch": (True, reason), "cpp": (bool, reason), "triton": (bool, reason)}.
    """
    mod, why = _load_ext()
    cpp = (True, f"C++ extension loaded (OpenMP {'on' if getattr(mod, 'openmp', False) else 'off'})") if mod else (False, why)
    return {"torch": (True, "pure PyTorch reference, always available"), "cpp": cpp, "triton": _triton_status()}


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, *, has_cpp: bool = True, has_triton: bool = True) -> str:
    """The concrete backend ("torch", "cpp" or "triton") for tensors on `device`.

    Under torch.compile the choice is made once, at trace time, and baked into the graph (it depends
    on the environment, not on tensor data), so tracing never enters the import machinery.

    has_cpp / has_triton say whether this op has that backend at all (an op may lack one).
    Raises ValueError for an unknown name and RuntimeError, saying how to get it, when an explicitly
    requested backend cannot run here.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("KDFAST_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"KDFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if has_triton and _triton_import()[0] else "torch"
        if device.type == "cpu" and has_cpp and ext() is not None:
            return "cpp"
        return "torch"
    if backend == "torch":
        return "torch"
    if backend == "cpp":
        if not has_cpp:
            raise RuntimeError("this op has no cpp backend; use backend='torch' or 'auto'")
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        if ext() is None:
            raise RuntimeError(f"backend='cpp' is not available: {_load_ext()[1]}")
        return "cpp"
    # triton
    if not has_triton:
        raise RuntimeError("this op has no triton backend; use backend='torch' or 'auto'")
    ok, why = _triton_import()
    if not ok:
        raise RuntimeError(f"backend='triton' is not available: {why}")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before kdfast is imported, to run the interpreter on CPU tensors)")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' does not run on {device}")
    return "triton"


def num_threads() -> int:
    """Threads for the C++ kernels: the same as PyTorch's intra-op setting."""
    return max(1, torch.get_num_threads())
