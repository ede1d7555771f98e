"""FTD - Full Topology Distillation (Kang et al., KDD'21); docs/METHODS.md section 4.

Entities of a step: V = the batch's unique users followed by its unique items (pos and neg
together); t, s are the teacher / student rows of V. The student's relations (cosine similarities)
fit the teacher's over every ordered pair, a == b included (the authors' matrix sum):

    L = lambda_td * sum_{a, b in V} (cos(t_a, t_b) - cos(s_a, s_b))^2

computed by kdfast.ops.topology.topology_loss without any |V| x |V| matrix.
"""

from __future__ import annotations

import torch

from .._core import checks
from .._core.numerics import gather_rows
from ..ops.topology import topology_loss
from .base import BACKEND, FrozenTeacher, batch_entities, checked_options


class FTD(FrozenTeacher):
    """Full Topology Distillation: the student's cosine relations among the batch's entities fit the
    teacher's.

    Options (defaults): lambda_td (0.001), backend ("auto"; see kdfast.topology_loss).
    """

    name = "ftd"
    option_rules = {"lambda_td": checks.positive_number, "backend": BACKEND}

    @classmethod
    @checked_options
    def build(
        cls,
        teacher_user,
        teacher_item,
        train,
        student_dim,
        *,
        generator=None,
        lambda_td=0.001,
        backend="auto",
    ):
        method = cls(teacher_user, teacher_item)
        method.lambda_td, method.backend = lambda_td, backend
        return method

    def forward(self, student_user, student_item, users, pos, neg):
        self.check_batch(student_user, student_item, users, pos, neg)
        u, i = batch_entities(users, pos, neg)
        t = torch.cat(
            [self.teacher_user.index_select(0, u), self.teacher_item.index_select(0, i)]
        ).to(student_user.dtype)
        s = torch.cat([gather_rows(student_user, u), gather_rows(student_item, i)])
        return self.lambda_td * topology_loss(t, s, backend=self.backend)
