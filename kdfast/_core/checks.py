"""Argument and option checks: each returns the checked value and raises TypeError/ValueError naming
the argument and what was expected. The ops check their tensors with the first group, the methods
and the command line their options with the second."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------ tensors
def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _rank(x, name, ndim):
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def floating(x, name: str, ndim: int | None = None) -> torch.Tensor:
    """x must be a floating-point tensor (optionally of rank ndim)."""
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    _rank(x, name, ndim)
    return x


def integer(x, name: str, ndim: int | None = None) -> torch.Tensor:
    """x must be an integer tensor (optionally of rank ndim)."""
    tensor(x, name)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    _rank(x, name, ndim)
    return x


def rows_of(x, name: str, n_rows: int, what: str) -> torch.Tensor:
    """x (already type-checked) must have n_rows rows, one per row of `what`."""
    if x.shape[0] != n_rows:
        raise ValueError(f"{name} must have {n_rows} rows like {what}, got shape {tuple(x.shape)}")
    return x


def same_dtype(a, a_name: str, b, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(
            f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}"
        )


def same_dim(a, a_name: str, b, b_name: str) -> None:
    """Two 2-D tensors with the same number of columns (embedding dimension)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same dimension d, "
            f"got {a.shape[1]} and {b.shape[1]}"
        )


def same_device(**tensors) -> torch.device:
    """All given (non-None) tensors live on one device that holds data (not "meta"); returns it."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on the same device, got {desc}")
    device = next(iter(devices.values()))
    if device.type == "meta":
        raise ValueError(
            f"{', '.join(devices)} on the meta device hold no data; kdfast ops compute on CPU or "
            "CUDA tensors (torch.compile traces them with fake tensors of those devices)"
        )
    return device


def index_range(idx: torch.Tensor, name: str, upper: int, allow_pad: bool = False) -> None:
    """Every entry of idx is in [0, upper) (or -1 when allow_pad)."""
    if idx.numel() == 0:
        return
    lo = int(idx.min())
    hi = int(idx.max())
    low_ok = -1 if allow_pad else 0
    if lo < low_ok or hi >= upper:
        allowed = f"[0, {upper})" + (" or -1 (padding)" if allow_pad else "")
        raise ValueError(f"{name} holds ids outside {allowed}: min {lo}, max {hi}")


def reduction(v, allowed=("sum", "mean", "none")) -> str:
    """A loss reduction name among `allowed`."""
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {v!r}")
    return v


# ------------------------------------------------------------------------------------ plain values
def _int_value(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def positive_int(v, name: str) -> int:
    """An int >= 1 (numpy integers accepted)."""
    v = _int_value(v, name)
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def nonneg_int(v, name: str) -> int:
    """An int >= 0 (numpy integers accepted)."""
    v = _int_value(v, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    return float(v)


def positive_number(v, name: str) -> float:
    """A number > 0 (inf allowed: some options use it for "no limit")."""
    v = _number(v, name)
    if not v > 0:
        raise ValueError(f"{name} must be a number > 0, got {v!r}")
    return v


def finite_positive(v, name: str) -> float:
    """A finite number > 0."""
    v = positive_number(v, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return v


def probability(v, name: str) -> float:
    """A number in [0, 1]."""
    v = _number(v, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    return v


def boolean(v, name: str) -> bool:
    """True or False (not 0/1)."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


def one_of(v, name: str, allowed) -> str:
    """One of the given names."""
    if v not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {v!r}")
    return v
