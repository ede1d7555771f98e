"""Test set-up: without a CUDA device the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any Triton backend
(kdfast/ops/<op>/triton.py) is imported (the ops import them on first use).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kdfast._core import backend as _backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends():
    """The concrete backends usable in this process (torch always)."""
    status = _backend.backends()
    return [name for name in ("torch", "cpp", "triton", "numba") if status[name][0]]


def backend_params(*names):
    """pytest params for the given backends, skipping (with the reason) those not usable here."""
    status = _backend.backends()
    params = []
    for name in names or ("torch", "cpp", "triton", "numba"):
        ok, why = status[name]
        params.append(
            pytest.param(
                name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {why}"), id=name
            )
        )
    return params


def device_of(backend):
    """The device a backend's inputs live on in these tests."""
    return "cpu" if backend in ("cpp", "numba") else DEVICE


@pytest.fixture
def device_for():
    """device_of, as a fixture."""
    return device_of
