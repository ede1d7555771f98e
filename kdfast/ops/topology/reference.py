"""Reference topology losses (Topology Distillation, KDD'21): the direct N x N formulas. They are
the oracle of the tests and, through the two backend functions at the end (whose gradients are the
oracle's own, by torch.func.vjp), the "torch" backend.

Relations are cosine similarities of the rows. A row of norm 0 normalises to the zero vector: its
cosine with every row (itself included) is 0, and it receives gradient 0 (never NaN).

FTD (ordered pairs, a == b included, as the authors' matrix sum):
    L = sum_{a,b} (cos(t_a, t_b) - cos(s_a, s_b))^2
HTD entity level (same ordered-pair convention, restricted to pairs in the same group and, with the
teacher-cosine filter on as in the authors' code, to pairs whose teacher cosine is > 0):
    L_ent = sum_{a,b: g_a == g_b [, cos(t_a,t_b) > 0]} (cos(s_a, s_b) - cos(t_a, t_b))^2
"""

from __future__ import annotations

import torch

from ..._core.autodiff import value_and_grads
from ..._core.numerics import acc_dtype, normalize_rows


def topology_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """FTD loss, sum over all ordered pairs, through the N x N cosine matrices (differentiable)."""
    dt = acc_dtype(student.dtype)
    a = normalize_rows(teacher.to(dt))
    b = normalize_rows(student.to(dt))
    diff = a @ a.T - b @ b.T
    return (diff * diff).sum()


def grouped_mask(
    teacher_cos: torch.Tensor, groups: torch.Tensor, teacher_cos_filter: bool
) -> torch.Tensor:
    """The [N, N] bool mask of the counted ordered pairs."""
    mask = groups[:, None] == groups[None, :]
    if teacher_cos_filter:
        mask = mask & (teacher_cos > 0)
    return mask


def grouped_topology_loss(teacher, student, groups, teacher_cos_filter: bool = True):
    """HTD entity-level loss and the number of counted ordered pairs, through N x N matrices.

    The teacher is detached (it is frozen in HTD; the fast backends give it no gradient either).
    Returns (loss, count), loss differentiable with respect to the student.
    """
    dt = acc_dtype(student.dtype)
    a = normalize_rows(teacher.detach().to(dt))
    b = normalize_rows(student.to(dt))
    tc = a @ a.T
    mask = grouped_mask(tc, groups, teacher_cos_filter)
    diff = b @ b.T - tc
    loss = torch.where(mask, diff * diff, torch.zeros_like(diff)).sum()
    return loss, mask.sum()


# ------------------------------------------------------------------------------ the torch backend
def topology_loss_grads(teacher, student, grad_teacher: bool, grad_student: bool):
    """Backend contract (see kdfast.ops.topology): (loss [], d loss/d teacher, d loss/d student)."""
    dt = acc_dtype(student.dtype)
    loss, (gt, gs) = value_and_grads(
        topology_loss, (teacher.to(dt), student.to(dt)), (grad_teacher, grad_student)
    )
    return loss, gt, gs


def grouped_topology_loss_grads(
    teacher, student, groups, n_groups: int, teacher_cos_filter: bool, grad_student: bool
):
    """Backend contract: (loss [], count [] int64, d loss/d student)."""
    dt = acc_dtype(student.dtype)

    def loss(student):
        return grouped_topology_loss(teacher, student, groups, teacher_cos_filter)

    value, count, (gs,) = value_and_grads(loss, (student.to(dt),), (grad_student,), has_aux=True)
    return value, count, gs
