"""Argument checks shared by the public ops: each raises ValueError/TypeError naming the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(x, name: str, ndim: int | None = None) -> torch.Tensor:
    """x must be a floating-point tensor (optionally of rank ndim)."""
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def integer(x, name: str, ndim: int | None = None) -> torch.Tensor:
    tensor(x, name)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def same_device(**tensors) -> torch.device:
    """All given (non-None) tensors live on one device; returns it."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on the same device, got {desc}")
    return next(iter(devices.values()))


def positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            import numpy as np
            if isinstance(v, np.integer):
                v = int(v)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def reduction(v, allowed=("sum", "mean", "none")) -> str:
    """A loss reduction name among `allowed`."""
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {v!r}")
    return v


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
