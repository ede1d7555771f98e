"""PHR - Personalized Hint Regression (Kang et al., KBS'22); docs/METHODS.md section 3.

Each entity e gets its own map from the student's representation to the frozen teacher's, produced
by a personalization network on the teacher representation:

    W_e = reshape(PNet(h_t_e), [d_t, d_s]);  hhat_e = W_e h_s_e;  l(e) = ||h_t_e - hhat_e||^2
    L = lambda_phr * (sum_{unique users} l + 0.5 (sum_{unique pos} l + sum_{unique neg} l))

(DE's weighting of the batch's entities).

PNet: d_t -> d_t + d_s d_t -> relu -> d_s d_t by default (PersonalizationNet), shared by users and
items; the paper's exact input is unverified, so the network is replaceable (option pnet). PHR has
no temperature: start_epoch does nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .._core import checks
from .._core.numerics import gather_rows
from .base import FrozenTeacher, checked_options
from .experts import make_linear


def _module_or_none(v, name):
    """None or a torch.nn.Module."""
    if v is not None and not isinstance(v, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(v).__name__}")
    return v


class PersonalizationNet(nn.Module):
    """PHR's default personalization network: d_t -> d_t + d_s d_t -> relu -> d_s d_t."""

    def __init__(self, d_t: int, d_s: int, generator=None):
        super().__init__()
        hidden = d_t + d_s * d_t
        self.net = nn.Sequential(
            make_linear(d_t, hidden, generator),
            nn.ReLU(),
            make_linear(hidden, d_s * d_t, generator),
        )

    def forward(self, h_t):
        return self.net(h_t)


class PHR(FrozenTeacher):
    """Personalized Hint Regression: a per-entity map W_e = PNet(h_t_e) regresses h_t from h_s.

    Options (defaults): lambda_phr (0.01); pnet: any nn.Module mapping [B, d_t] -> [B, d_t * d_s]
    (None: PersonalizationNet, drawn from the generator).
    """

    name = "phr"
    option_rules = {"lambda_phr": checks.positive_number, "pnet": _module_or_none}

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
        lambda_phr=0.01,
        pnet=None,
    ):
        method = cls(teacher_user, teacher_item, student_dim)
        method.lambda_phr = lambda_phr
        d_t, d_s = teacher_user.shape[1], method.student_dim
        method.pnet = pnet if pnet is not None else PersonalizationNet(d_t, d_s, generator)
        return method

    def forward(self, student_user, student_item, users, pos, neg):
        """lambda_phr * (sum_{unique users} l + 0.5 (sum_{unique pos} l + sum_{unique neg} l)),
        with one PNet call over the stacked rows (users, unique positives, unique negatives): PNet
        is shared by users and items and maps each row on its own, so one large GEMM replaces three
        smaller ones."""
        self.check_batch(student_user, student_item, users, pos, neg)
        d_t, d_s = self.teacher_user.shape[1], self.student_dim
        u = torch.unique(users)
        items = torch.cat([torch.unique(pos), torch.unique(neg)])
        dtype = student_user.dtype
        h_t = torch.cat(
            [self.teacher_user.index_select(0, u), self.teacher_item.index_select(0, items)]
        ).to(dtype)
        h_s = torch.cat([gather_rows(student_user, u), gather_rows(student_item, items)])
        w = self.pnet(h_t)
        if w.shape != (h_t.shape[0], d_t * d_s):
            raise ValueError(f"pnet must return [B, {d_t * d_s}] (d_t * d_s), got {tuple(w.shape)}")
        hhat = torch.bmm(w.view(-1, d_t, d_s), h_s[:, :, None])[:, :, 0]
        per_row = ((h_t - hhat) ** 2).sum(1)
        n_u = u.shape[0]
        return self.lambda_phr * (per_row[:n_u].sum() + 0.5 * per_row[n_u:].sum())
