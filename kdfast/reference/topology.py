"""Reference topology losses (Topology Distillation, KDD'21): the direct N x N formulas.

Relations are cosine similarities of the rows. A row of norm 0 normalises to the zero vector: its
cosine with every row (itself included) is 0, and it receives gradient 0 (never NaN).

FTD (ordered pairs, a == b included, as the authors' matrix sum):
    L = sum_{a,b} (cos(t_a, t_b) - cos(s_a, s_b))^2
HTD entity level (same ordered-pair convention, restricted to pairs in the same group and, with the
teacher-cosine filter on as in the authors' code, to pairs whose teacher cosine is > 0):
    L_ent = sum_{a,b: g_a == g_b [, cos(t_a,t_b) > 0]} (cos(s_a, s_b) - cos(t_a, t_b))^2

These functions are differentiable with autograd (O(N^2) memory); they are the oracle for the fast
backends, and `*_grads` adapt them to the backend signature used by kdfast.ops.topology.
"""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| row-wise; rows of norm 0 map to 0 with gradient 0."""
    n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    pos = n > 0
    inv = torch.where(pos, 1.0 / torch.where(pos, n, torch.ones_like(n)), torch.zeros_like(n))
    return x * inv


def topology_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """FTD loss, sum over all ordered pairs, through the N x N cosine matrices (differentiable)."""
    dt = compute_dtype(student)
    a = normalize_rows(teacher.to(dt))
    b = normalize_rows(student.to(dt))
    diff = a @ a.T - b @ b.T
    return (diff * diff).sum()


def grouped_mask(teacher_cos: torch.Tensor, groups: torch.Tensor, teacher_cos_filter: bool) -> torch.Tensor:
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
    dt = compute_dtype(student)
    a = normalize_rows(teacher.detach().to(dt))
    b = normalize_rows(student.to(dt))
    tc = a @ a.T
    mask = grouped_mask(tc, groups, teacher_cos_filter)
    diff = b @ b.T - tc
    loss = torch.where(mask, diff * diff, torch.zeros_like(diff)).sum()
    return loss, mask.sum()


def _inv_norms(x):
    n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return torch.where(n > 0, 1.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))


def normalize_backward(x_unit, inv, g):
    """Gradient with respect to x of x * inv (inv = 1/||x|| or 0) given g = dL/d(x * inv)."""
    return inv * (g - x_unit * (x_unit * g).sum(dim=1, keepdim=True))


# The backend adapters run inside the custom op, where autograd is off: they write the gradients of the
# N x N formulas out explicitly (the tests check them against autograd of the functions above).
def topology_loss_grads(teacher, student, grad_teacher: bool, grad_student: bool):
    """Backend signature: (loss [] compute dtype, d loss/d teacher or empty, d loss/d student or empty)."""
    dt = compute_dtype(student)
    t, s = teacher.to(dt), student.to(dt)
    it, is_ = _inv_norms(t), _inv_norms(s)
    a, b = t * it, s * is_
    diff = a @ a.T - b @ b.T
    loss = (diff * diff).sum()
    gt = normalize_backward(a, it, 4 * diff @ a) if grad_teacher else teacher.new_empty(0)
    gs = normalize_backward(b, is_, -4 * diff @ b) if grad_student else student.new_empty(0)
    return loss, gt, gs


def grouped_topology_loss_grads(teacher, student, groups, n_groups: int, teacher_cos_filter: bool,
                                grad_student: bool):
    """Backend signature: (loss [], count [] int64, d loss/d student or empty)."""
    del n_groups  # ids were range-checked by the caller; the mask needs only equality
    dt = compute_dtype(student)
    t, s = teacher.to(dt), student.to(dt)
    a = t * _inv_norms(t)
    is_ = _inv_norms(s)
    b = s * is_
    tc = a @ a.T
    mask = grouped_mask(tc, groups, teacher_cos_filter)
    diff = torch.where(mask, b @ b.T - tc, torch.zeros_like(tc))
    loss = (diff * diff).sum()
    gs = normalize_backward(b, is_, 4 * diff @ b) if grad_student else student.new_empty(0)
    return loss, mask.sum(), gs
