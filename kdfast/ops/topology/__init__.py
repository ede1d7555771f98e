"""kdfast.topology_loss (FTD) and kdfast.grouped_topology_loss (HTD entity level), never N x N.

Both are torch.library custom ops with fake implementations and autograd, so they trace under
torch.compile(fullgraph=True). The backends compute the loss and, in the same call, the gradients
autograd will need (of the inputs that require grad); the backward only scales them by the incoming
gradient (first order only: a second derivative raises).

Backends (one row each in BACKENDS, the same functions in each module; teacher and student of one
dtype; the loss in float32, float64 for float64 inputs; empty [0] tensors for gradients not asked
for):
    topology_loss_grads(teacher, student, grad_teacher, grad_student)
        -> (loss [], d loss/d teacher [N, d_t], d loss/d student [N, d_s])
    grouped_topology_loss_grads(teacher, student, groups, n_groups, teacher_cos_filter,
        grad_student) -> (loss [], counted ordered pairs [] int64, d loss/d student [N, d_s])
"""

from __future__ import annotations

import torch

from ..._core import backend as _backend
from ..._core import checks
from ..._core.autodiff import check_kept, differentiable, requires_grad, scaled
from ..._core.numerics import acc_dtype
from . import cpu, reference


def _triton():
    from . import triton  # on first use: Triton reads TRITON_INTERPRET when the kernels are defined

    return triton


BACKENDS = {"torch": lambda: reference, "cpp": lambda: cpu, "triton": _triton}
REDUCTIONS = ("sum", "mean")


# ---------------------------------------------------------------------------------------------- FTD
def _ftd_impl(teacher, student, grad_teacher, grad_student, backend):
    impl = BACKENDS[backend]()
    loss, gt, gs = impl.topology_loss_grads(
        teacher.contiguous(), student.contiguous(), grad_teacher, grad_student
    )
    return loss.to(acc_dtype(student.dtype)), gt, gs


@torch.library.custom_op("kdfast::topology_loss", mutates_args=())
def _ftd_op(
    teacher: torch.Tensor,
    student: torch.Tensor,
    grad_teacher: bool,
    grad_student: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ftd_impl(teacher, student, grad_teacher, grad_student, backend)


@_ftd_op.register_fake
def _(teacher, student, grad_teacher, grad_student, backend):
    return (
        student.new_empty((), dtype=acc_dtype(student.dtype)),
        teacher.new_empty(teacher.shape if grad_teacher else (0,)),
        student.new_empty(student.shape if grad_student else (0,)),
    )


def _ftd_setup(ctx, inputs, output):
    teacher, student, grad_teacher, grad_student, _ = inputs
    ctx.dtypes = (teacher.dtype if grad_teacher else None, student.dtype if grad_student else None)
    # the gradient outputs get no gradient: no [N, d] zeros for them
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2])


def _ftd_backward(ctx, g_loss, *unused, bwd):
    check_kept(ctx, {0: ctx.dtypes[0] is not None, 1: ctx.dtypes[1] is not None}, "topology_loss")
    if g_loss is None:
        return None, None, None, None, None
    (gt, gs), (t_dt, s_dt) = ctx.saved_tensors, ctx.dtypes
    return scaled(g_loss, gt, t_dt), scaled(g_loss, gs, s_dt), None, None, None


_ftd = differentiable(
    _ftd_op,
    _ftd_impl,
    setup=_ftd_setup,
    backward=_ftd_backward,
    name="topology_loss",
    module="topology",
)


def _check_pair(teacher, student):
    checks.floating(teacher, "teacher", ndim=2)
    checks.floating(student, "student", ndim=2)
    device = checks.same_device(teacher=teacher, student=student)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(
            "teacher and student must have the same number of rows (entities), got "
            f"{teacher.shape[0]} and {student.shape[0]}"
        )
    if teacher.shape[1] < 1 or student.shape[1] < 1:
        raise ValueError(
            "teacher and student need at least one column, got shapes "
            f"{tuple(teacher.shape)} and {tuple(student.shape)}"
        )
    return device


def topology_loss(
    teacher: torch.Tensor, student: torch.Tensor, *, reduction: str = "sum", backend: str = "auto"
) -> torch.Tensor:
    """Full Topology Distillation loss: squared differences of all pairwise cosine similarities.

    Args:
        teacher: [N, d_t] floating (the teacher's entity representations), taken in the student's
            dtype.
        student: [N, d_s] floating, same device (the student's representations of the same
            entities).
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
    then through the row normalisation: dL/dx_a = (g_a - u_a <u_a, g_a>) / ||x_a||. The cpp and
    triton backends evaluate the right-hand side: O(N (d_t + d_s)^2) time and O((d_t + d_s)^2) extra
    memory (plus the [N, d] gradients); the torch backend is the direct N x N formula. A row of norm
    0 has cosine 0 with every row (itself included) and gets gradient 0. The Gram rewrite subtracts
    quantities of size ~N^2/d, so float32 results carry an absolute error of about 1e-7 of that.
    Deterministic for a given backend, thread count and shapes. First-order only.
    """
    device = _check_pair(teacher, student)
    checks.reduction(reduction, REDUCTIONS)
    chosen = _backend.choose(backend, device.type, student.dtype, tuple(BACKENDS))
    teacher = teacher.to(student.dtype)
    loss = _ftd(teacher, student, requires_grad(teacher), requires_grad(student), chosen)[0]
    if reduction == "mean" and teacher.shape[0] > 0:
        loss = loss / float(teacher.shape[0]) ** 2
    return loss


# ------------------------------------------------------------------------------- HTD entity level
def _grouped_impl(teacher, student, groups, n_groups, teacher_cos_filter, grad_student, backend):
    checks.index_range(groups, "groups", n_groups)
    impl = BACKENDS[backend]()
    loss, count, gs = impl.grouped_topology_loss_grads(
        teacher.contiguous(),
        student.contiguous(),
        groups.to(torch.int64).contiguous(),
        n_groups,
        teacher_cos_filter,
        grad_student,
    )
    return loss.to(acc_dtype(student.dtype)), count.to(torch.int64), gs


@torch.library.custom_op("kdfast::grouped_topology_loss", mutates_args=())
def _grouped_op(
    teacher: torch.Tensor,
    student: torch.Tensor,
    groups: torch.Tensor,
    n_groups: int,
    teacher_cos_filter: bool,
    grad_student: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grouped_impl(
        teacher, student, groups, n_groups, teacher_cos_filter, grad_student, backend
    )


@_grouped_op.register_fake
def _(teacher, student, groups, n_groups, teacher_cos_filter, grad_student, backend):
    return (
        student.new_empty((), dtype=acc_dtype(student.dtype)),
        student.new_empty((), dtype=torch.int64),
        student.new_empty(student.shape if grad_student else (0,)),
    )


def _grouped_setup(ctx, inputs, output):
    ctx.dtype = inputs[1].dtype if inputs[5] else None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2])


def _grouped_backward(ctx, g_loss, *unused, bwd):
    check_kept(ctx, {1: ctx.dtype is not None}, "grouped_topology_loss")
    if g_loss is None:
        return (None,) * 7
    (gs,) = ctx.saved_tensors
    return None, scaled(g_loss, gs, ctx.dtype), None, None, None, None, None


_grouped = differentiable(
    _grouped_op,
    _grouped_impl,
    setup=_grouped_setup,
    backward=_grouped_backward,
    name="grouped_topology_loss",
    module="topology",
)


def grouped_topology_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    groups: torch.Tensor,
    n_groups: int,
    *,
    teacher_cos_filter: bool = True,
    reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """HTD entity-level relations: topology loss over the pairs inside each group, never N x N.

    Args:
        teacher: [N, d_t] floating; FROZEN: it receives no gradient on any backend (as in HTD).
        student: [N, d_s] floating, same device.
        groups: [N] integer group id of each row, in [0, n_groups).
        n_groups: number of groups (>= 1).
        teacher_cos_filter: keep only pairs whose teacher cosine is > 0 (the authors' code;
            default).
        reduction: "sum" (default) or "mean" (divided by the number of counted ordered pairs, or
            1).
        backend: "auto", "torch", "cpp" or "triton".

    Returns:
        0-d float32 (float64 for float64 student) loss, differentiable with respect to the student.

    Math, over ORDERED pairs with a == b included (the authors' masked matrix sum; a pair a != b
    counts twice, the diagonal adds 0 because cos(x, x) = 1 on both sides, a zero row has cosine 0
    everywhere):
        L = sum_{a,b: g_a == g_b [and cos(t_a,t_b) > 0]} (cos(s_a,s_b) - cos(t_a,t_b))^2
        dL/dB_a = 4 sum_b m_ab (cos(s_a,s_b) - cos(t_a,t_b)) B_b, then through the row
        normalisation.
    The fast backends sort rows by group (block-diagonal mask) and visit only same-group tiles,
    recomputing cosines on the fly: O(sum_g n_g^2 (d_t + d_s)) time, O(N (d_t + d_s)) extra memory.
    With the filter off both fast backends use the per-group Gram rewrite (O(N (d_t+d_s)^2), one
    (d_t+d_s)^2 Gram per group; triton falls back to the tiled kernel when the per-group Grams would
    exceed 64 MB). Deterministic for a given backend and thread count. First-order only.
    """
    device = _check_pair(teacher, student)
    checks.integer(groups, "groups", ndim=1)
    checks.same_device(teacher=teacher, groups=groups)
    if groups.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"groups must have one entry per row: {teacher.shape[0]} rows, "
            f"got {groups.shape[0]} ids"
        )
    n_groups = checks.positive_int(n_groups, "n_groups")
    teacher_cos_filter = checks.boolean(teacher_cos_filter, "teacher_cos_filter")
    checks.reduction(reduction, REDUCTIONS)
    chosen = _backend.choose(backend, device.type, student.dtype, tuple(BACKENDS))
    teacher = teacher.detach().to(student.dtype)
    loss, count, _ = _grouped(
        teacher, student, groups, n_groups, teacher_cos_filter, requires_grad(student), chosen
    )
    if reduction == "mean":
        loss = loss / count.clamp(min=1).to(loss.dtype)
    return loss
