"""kdfast.topology_loss (FTD) and kdfast.grouped_topology_loss (HTD entity level), never N x N.

Both are torch.library custom ops with fake implementations and autograd, so they trace under
torch.compile(fullgraph=True). The backend kernels compute the loss and, in the same call, the
gradients that autograd will need (the inputs that require grad); backward only scales them by the
incoming gradient. Double backward is not supported.
"""
from __future__ import annotations

import importlib

import torch

from .. import _backend, _checks

REDUCTIONS = ("sum", "mean")


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device) -> str:
    # Backend choice is a trace-time constant: under torch.compile the lookup (which imports the
    # extension) runs eagerly once instead of being traced.
    return _backend.resolve(backend, device)


def _impl(backend: str):
    return importlib.import_module(f"kdfast.{'reference' if backend == 'torch' else backend}.topology")


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- FTD
@torch.library.custom_op("kdfast::topology_loss", mutates_args=())
def _ftd_op(teacher: torch.Tensor, student: torch.Tensor, grad_teacher: bool, grad_student: bool,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, gt, gs = _impl(backend).topology_loss_grads(teacher.contiguous(), student.contiguous(),
                                                      grad_teacher, grad_student)
    return loss.to(_acc_dtype(student)), gt.to(teacher.dtype), gs.to(student.dtype)


@_ftd_op.register_fake
def _(teacher, student, grad_teacher, grad_student, backend):
    return (student.new_empty((), dtype=_acc_dtype(student)),
            teacher.new_empty(teacher.shape if grad_teacher else (0,)),
            student.new_empty(student.shape if grad_student else (0,)))


def _ftd_setup(ctx, inputs, output):
    ctx.grad_teacher, ctx.grad_student = inputs[2], inputs[3]
    ctx.set_materialize_grads(False)  # the gradient outputs get no gradient: no [N, d] zero tensors for them
    ctx.save_for_backward(output[1], output[2])


def _ftd_backward(ctx, g_loss, g_gt, g_gs):
    if g_loss is None:
        return None, None, None, None, None
    gt, gs = ctx.saved_tensors
    out_t = (gt * g_loss.to(gt.dtype)) if ctx.grad_teacher else None
    out_s = (gs * g_loss.to(gs.dtype)) if ctx.grad_student else None
    return out_t, out_s, None, None, None


_ftd_op.register_autograd(_ftd_backward, setup_context=_ftd_setup)


def _check_pair(teacher, student):
    _checks.floating(teacher, "teacher", ndim=2)
    _checks.floating(student, "student", ndim=2)
    device = _checks.same_device(teacher=teacher, student=student)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"teacher and student must have the same number of rows (entities), got "
                         f"{teacher.shape[0]} and {student.shape[0]}")
    if teacher.shape[1] < 1 or student.shape[1] < 1:
        raise ValueError(f"teacher and student need at least one column, got shapes {tuple(teacher.shape)} "
                         f"and {tuple(student.shape)}")
    return device


def _check_reduction(reduction):
    _checks.reduction(reduction, REDUCTIONS)


def _cpp_dtypes(chosen, teacher, student):
    if chosen == "cpp" and (teacher.dtype not in (torch.float32, torch.float64) or student.dtype != teacher.dtype):
        raise TypeError("backend='cpp' takes teacher and student of one dtype, float32 or float64; got "
                        f"{teacher.dtype} and {student.dtype}")


def topology_loss(teacher: torch.Tensor, student: torch.Tensor, *, reduction: str = "sum",
                  backend: str = "auto") -> torch.Tensor:
    """Full Topology Distillation loss: squared differences of all pairwise cosine similarities.

    Args:
        teacher: [N, d_t] floating (the teacher's entity representations).
        student: [N, d_s] floating, same device (the student's representations of the same entities).
        reduction: "sum" (default; the authors' sum over pairs) or "mean" (divided by N^2).
        backend: "auto", "torch", "cpp" or "triton" (see kdfast.backends()).

    Returns:
        The loss, a 0-d tensor of float32 (float64 for float64 student input), differentiable with
        respect to the student and the teacher (both gradients are cheap; the frozen teacher of FTD
        simply does not require grad).

    Math (ordered pairs, a == b included, as the authors' matrix sum), with A, B the row-normalised
    teacher and student:
        L = sum_{a,b} (cos(t_a,t_b) - cos(s_a,s_b))^2 = ||A A^T - B B^T||_F^2
          = ||A^T A||_F^2 + ||B^T B||_F^2 - 2 ||A^T B||_F^2
        dL/dB = 4 (B (B^T B) - A (A^T B)),  dL/dA = 4 (A (A^T A) - B (B^T A)),
    then through the row normalisation: dL/dx_a = (g_a - u_a <u_a, g_a>) / ||x_a||. The cpp and triton
    backends evaluate the right-hand side: O(N (d_t + d_s)^2) time and O((d_t + d_s)^2) extra memory
    (plus the [N, d] gradients); the torch backend is the direct N x N formula. A row of norm 0 has
    cosine 0 with every row (itself included) and gets gradient 0. The Gram rewrite subtracts
    quantities of size ~N^2/d, so float32 results carry an absolute error of about 1e-7 of that.
    Deterministic for a given backend, thread count and shapes.
    """
    device = _check_pair(teacher, student)
    _check_reduction(reduction)
    chosen = _resolve(backend, device)
    _cpp_dtypes(chosen, teacher, student)
    grad_on = torch.is_grad_enabled()
    loss, _, _ = _ftd_op(teacher, student, grad_on and teacher.requires_grad, grad_on and student.requires_grad,
                         chosen)
    if reduction == "mean" and teacher.shape[0] > 0:
        loss = loss / float(teacher.shape[0]) ** 2
    return loss


# ---------------------------------------------------------------- HTD entity level
@torch.library.custom_op("kdfast::grouped_topology_loss", mutates_args=())
def _grouped_op(teacher: torch.Tensor, student: torch.Tensor, groups: torch.Tensor, n_groups: int,
                teacher_cos_filter: bool, grad_student: bool, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _checks.index_range(groups, "groups", n_groups)
    loss, count, gs = _impl(backend).grouped_topology_loss_grads(
        teacher.contiguous(), student.contiguous(), groups.to(torch.int64).contiguous(), n_groups,
        teacher_cos_filter, grad_student)
    return loss.to(_acc_dtype(student)), count.to(torch.int64), gs.to(student.dtype)


@_grouped_op.register_fake
def _(teacher, student, groups, n_groups, teacher_cos_filter, grad_student, backend):
    return (student.new_empty((), dtype=_acc_dtype(student)), student.new_empty((), dtype=torch.int64),
            student.new_empty(student.shape if grad_student else (0,)))


def _grouped_setup(ctx, inputs, output):
    ctx.grad_student = inputs[5]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2])


def _grouped_backward(ctx, g_loss, g_count, g_gs):
    if g_loss is None:
        return None, None, None, None, None, None, None
    (gs,) = ctx.saved_tensors
    out_s = (gs * g_loss.to(gs.dtype)) if ctx.grad_student else None
    return None, out_s, None, None, None, None, None


_grouped_op.register_autograd(_grouped_backward, setup_context=_grouped_setup)


def grouped_topology_loss(teacher: torch.Tensor, student: torch.Tensor, groups: torch.Tensor, n_groups: int, *,
                          teacher_cos_filter: bool = True, reduction: str = "sum",
                          backend: str = "auto") -> torch.Tensor:
    """HTD entity-level relations: topology loss over the pairs inside each group, never N x N.

    Args:
        teacher: [N, d_t] floating; FROZEN: it receives no gradient on any backend (as in HTD).
        student: [N, d_s] floating, same device.
        groups: [N] integer group id of each row, in [0, n_groups).
        n_groups: number of groups (>= 1).
        teacher_cos_filter: keep only pairs whose teacher cosine is > 0 (the authors' code; default).
        reduction: "sum" (default) or "mean" (divided by the number of counted ordered pairs, or 1).
        backend: "auto", "torch", "cpp" or "triton".

    Returns:
        0-d float32 (float64 for float64 student) loss, differentiable with respect to the student.

    Math, over ORDERED pairs with a == b included (the authors' masked matrix sum; a pair a != b counts
    twice, the diagonal adds 0 because cos(x, x) = 1 on both sides, a zero row has cosine 0 everywhere):
        L = sum_{a,b: g_a == g_b [and cos(t_a,t_b) > 0]} (cos(s_a,s_b) - cos(t_a,t_b))^2
        dL/dB_a = 4 sum_b m_ab (cos(s_a,s_b) - cos(t_a,t_b)) B_b, then through the row normalisation.
    The fast backends sort rows by group (block-diagonal mask) and visit only same-group tiles,
    recomputing cosines on the fly: O(sum_g n_g^2 (d_t + d_s)) time, O(N (d_t + d_s)) extra memory.
    With the filter off both fast backends use the per-group Gram rewrite (O(N (d_t+d_s)^2), one
    (d_t+d_s)^2 Gram per group; triton falls back to the tiled kernel when the per-group Grams would
    exceed 64 MB). Deterministic for a given backend and thread count.
    """
    device = _check_pair(teacher, student)
    _checks.integer(groups, "groups", ndim=1)
    _checks.same_device(teacher=teacher, groups=groups)
    if groups.shape[0] != teacher.shape[0]:
        raise ValueError(f"groups must have one entry per row: {teacher.shape[0]} rows, got {groups.shape[0]} ids")
    n_groups = _checks.positive_int(n_groups, "n_groups")
    if not isinstance(teacher_cos_filter, bool):
        raise TypeError(f"teacher_cos_filter must be a bool, got {type(teacher_cos_filter).__name__}")
    _check_reduction(reduction)
    chosen = _resolve(backend, device)
    _cpp_dtypes(chosen, teacher, student)
    grad_s = torch.is_grad_enabled() and student.requires_grad
    loss, count, _ = _grouped_op(teacher, student, groups, n_groups, teacher_cos_filter, grad_s, chosen)
    if reduction == "mean":
        loss = loss / count.clamp(min=1).to(loss.dtype)
    return loss
