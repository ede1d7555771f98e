"""C++ (OpenMP) backend of the topology losses (csrc/topology.cpp), with the signatures of the op's
backend contract (kdfast.ops.topology): teacher and student of one dtype, float32 or float64."""

from __future__ import annotations

import torch

from ..._core import backend
from ..._core.csr import from_counts


def _ptr(x):
    return x.data_ptr() if x.numel() else 0


def topology_loss_grads(teacher, student, grad_teacher: bool, grad_student: bool):
    """FTD via the Gram rewrite: (loss [], d loss/d teacher or empty, d loss/d student or empty)."""
    t, s = teacher.contiguous(), student.contiguous()
    n, dt = t.shape
    gt = torch.empty_like(t) if grad_teacher else t.new_empty(0)
    gs = torch.empty_like(s) if grad_student else s.new_empty(0)
    if n == 0:
        return t.new_zeros(()), gt, gs
    loss = backend.require_ext().topology_ftd(
        t.data_ptr(),
        s.data_ptr(),
        n,
        dt,
        s.shape[1],
        t.dtype == torch.float64,
        _ptr(gt),
        _ptr(gs),
        backend.num_threads(),
    )
    return torch.tensor(loss, dtype=t.dtype), gt, gs


def grouped_topology_loss_grads(
    teacher, student, groups, n_groups: int, teacher_cos_filter: bool, grad_student: bool
):
    """HTD entity level: (loss [], count [] int64, d loss/d student or empty). Rows are visited by
    group (a stable sort) through the group boundaries."""
    t, s = teacher.contiguous(), student.contiguous()
    n, dt = t.shape
    gs = torch.empty_like(s) if grad_student else s.new_empty(0)
    if n == 0:
        return t.new_zeros(()), torch.zeros((), dtype=torch.int64), gs
    perm = torch.argsort(groups, stable=True).contiguous()
    offsets = from_counts(torch.bincount(groups, minlength=n_groups))
    loss, count = backend.require_ext().topology_grouped(
        t.data_ptr(),
        s.data_ptr(),
        perm.data_ptr(),
        offsets.data_ptr(),
        n,
        n_groups,
        dt,
        s.shape[1],
        bool(teacher_cos_filter),
        t.dtype == torch.float64,
        _ptr(gs),
        backend.num_threads(),
    )
    return torch.tensor(loss, dtype=t.dtype), torch.tensor(count, dtype=torch.int64), gs
