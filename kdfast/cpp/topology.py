"""C++ (OpenMP) backend glue for the topology losses: checks buffers, preallocates outputs, calls kdfast._C."""
from __future__ import annotations

import torch

from .. import _backend


def _prepare(teacher, student):
    if teacher.dtype not in (torch.float32, torch.float64) or student.dtype != teacher.dtype:
        raise TypeError(f"cpp topology kernels take float32/float64 of one dtype, got {teacher.dtype}, {student.dtype}")
    return teacher.contiguous(), student.contiguous()


def _ptr(x):
    return x.data_ptr() if x.numel() else 0


def topology_loss_grads(teacher, student, grad_teacher: bool, grad_student: bool):
    """FTD via the Gram rewrite: (loss [] float64/float32, d loss/d teacher or empty, d loss/d student or empty)."""
    t, s = _prepare(teacher, student)
    n, dt = t.shape
    ds = s.shape[1]
    gt = torch.empty_like(t) if grad_teacher else t.new_empty(0)
    gs = torch.empty_like(s) if grad_student else s.new_empty(0)
    if n == 0:
        return t.new_zeros(()), gt, gs
    loss = _backend.ext().topology_ftd(t.data_ptr(), s.data_ptr(), n, dt, ds, t.dtype == torch.float64,
                                       _ptr(gt), _ptr(gs), _backend.num_threads())
    return torch.tensor(loss, dtype=t.dtype), gt, gs


def group_order(groups, n_groups: int):
    """(perm, offsets): rows sorted by group (stable) and the [n_groups + 1] int64 group boundaries."""
    perm = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=n_groups)
    offsets = torch.zeros(n_groups + 1, dtype=torch.int64, device=groups.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return perm.contiguous(), offsets


def grouped_topology_loss_grads(teacher, student, groups, n_groups: int, teacher_cos_filter: bool,
                                grad_student: bool):
    """HTD entity level: (loss [], count [] int64, d loss/d student or empty)."""
    t, s = _prepare(teacher, student)
    n, dt = t.shape
    ds = s.shape[1]
    gs = torch.empty_like(s) if grad_student else s.new_empty(0)
    if n == 0:
        return t.new_zeros(()), torch.zeros((), dtype=torch.int64), gs
    perm, offsets = group_order(groups, n_groups)
    loss, count = _backend.ext().topology_grouped(
        t.data_ptr(), s.data_ptr(), perm.data_ptr(), offsets.data_ptr(), n, n_groups, dt, ds,
        bool(teacher_cos_filter), t.dtype == torch.float64, _ptr(gs), _backend.num_threads())
    return torch.tensor(loss, dtype=t.dtype), torch.tensor(count, dtype=torch.int64), gs
