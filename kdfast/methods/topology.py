"""Topology Distillation (KDD'21), docs/METHODS.md section 4: FTD (full topology) and HTD (hierarchical topology).

Entities of a step: V = unique batch users followed by unique batch items (pos and neg together); t, s
are the teacher / student rows of V. Relations are cosine similarities; the pair sums run over ordered
pairs with a == b included (the authors' matrix sums), computed by kdfast.ops.topology without any
N x N matrix.
"""
from __future__ import annotations

import torch
from torch import nn

from .._core import checks as _checks
from ..ops.topology import grouped_topology_loss, topology_loss
from .._core.numerics import normalize_rows
from .base import KDMethod
from .latent import (AnnealedMethod, ExpertBank, check_batch, check_prob, check_student, check_teacher, gumbel_softmax,
                     make_linear, noise_generator)

GROUP_LEVELS = ("second", "first")


def batch_entities(users, pos, neg):
    """(unique users, unique items of pos and neg) of a batch."""
    return torch.unique(users), torch.unique(torch.cat([pos, neg]))


class FTD(KDMethod):
    """Full Topology Distillation: L = lambda_td * sum_{a,b in V} (cos(t_a,t_b) - cos(s_a,s_b))^2.

    Args (build options): lambda_td (0.001), backend ("auto"; see kdfast.topology_loss).
    """

    name = "ftd"

    def __init__(self, teacher_user, teacher_item, *, lambda_td: float = 0.001, backend: str = "auto"):
        super().__init__()
        check_teacher(teacher_user, teacher_item)
        self.lambda_td = float(lambda_td)
        self.backend = backend
        self.register_buffer("teacher_user", teacher_user.detach(), persistent=False)
        self.register_buffer("teacher_item", teacher_item.detach(), persistent=False)

    @classmethod
    def build(cls, teacher_user, teacher_item, train, student_dim, *, generator=None, **options):
        return cls(teacher_user, teacher_item, **options)

    def forward(self, student_user, student_item, users, pos, neg):
        check_student(student_user, student_item, self.teacher_user, self.teacher_item)
        check_batch(users, pos, neg)
        u, i = batch_entities(users, pos, neg)
        t = torch.cat([self.teacher_user[u], self.teacher_item[i]]).to(student_user.dtype)
        s = torch.cat([student_user[u], student_item[i]])
        return self.lambda_td * topology_loss(t, s, backend=self.backend)


def group_means(x: torch.Tensor, groups: torch.Tensor, n_groups: int):
    """([n_groups, d] mean row of each group (0 for empty groups), [n_groups] bool present).

    A one-hot matmul rather than index_add, so the result is deterministic on every device.
    """
    onehot = (groups[None, :] == torch.arange(n_groups, device=x.device)[:, None]).to(x.dtype)
    counts = onehot.sum(1)
    present = counts > 0
    return (onehot @ x) / counts.clamp(min=1)[:, None], present


class HTD(AnnealedMethod):
    """Hierarchical Topology Distillation (docs/METHODS.md section 4).

    Per side (users, items) a group assignment network v(h_t) = softmax(Linear(d_t -> K)); hard group of
    an entity z_e = argmax v (no gradient), item groups offset by K (2K groups in all).
      L_ent: kdfast.grouped_topology_loss over V with those groups (pairs in the same group, and with
             teacher cosine > 0 when teacher_cos_filter, the authors' default).
      L_grp 'second' (default): sum_{g present} sum_{a in V} (cos(P_s_g, s_a) - cos(P_t_g, t_a))^2 with
             group-mean prototypes P_t, P_s computed WITHOUT gradient (the authors' quirk).
            'first': sum_{g, h present} (cos(P_s_g, P_s_h) - cos(P_t_g, P_t_h))^2; here the student
             prototypes DO carry gradient (deviation: without it this term would be a constant).
      L_GA:  DE-style reconstruction with K experts per side and the Gumbel-softmax of v (annealed tau),
             sum over V (users and items alike, no 0.5 item weight); trains the assignment networks.
      L = lambda_td * (alpha (L_ent + L_grp) + (1 - alpha) L_GA).

    Args (build options): n_groups K (30), alpha (0.5), lambda_td (0.001), group_level ("second"),
    teacher_cos_filter (True), tau0 (1.0), tau_end (1e-10), select_only_below (None: as in DE, once tau
    falls below it the GA term evaluates only each entity's selected expert), backend ("auto").
    """

    name = "htd"

    def __init__(self, teacher_user, teacher_item, student_dim: int, *, n_groups: int = 30, alpha: float = 0.5,
                 lambda_td: float = 0.001, group_level: str = "second", teacher_cos_filter: bool = True,
                 tau0: float = 1.0, tau_end: float = 1e-10, select_only_below: float | None = None,
                 backend: str = "auto", generator=None):
        super().__init__(teacher_user, teacher_item, student_dim, tau0, tau_end, select_only_below)
        self.n_groups = _checks.positive_int(n_groups, "n_groups")
        self.alpha = check_prob(alpha, "alpha")
        if group_level not in GROUP_LEVELS:
            raise ValueError(f"group_level must be one of {GROUP_LEVELS}, got {group_level!r}")
        if not isinstance(teacher_cos_filter, bool):
            raise TypeError(f"teacher_cos_filter must be a bool, got {type(teacher_cos_filter).__name__}")
        self.group_level, self.teacher_cos_filter = group_level, teacher_cos_filter
        self.lambda_td = float(lambda_td)
        self.backend = backend
        d_t = teacher_user.shape[1]
        self.assign = nn.ModuleDict({side: make_linear(d_t, self.n_groups, generator) for side in ("user", "item")})
        self.experts = nn.ModuleDict({side: ExpertBank(self.n_groups, self.student_dim, d_t, generator)
                                      for side in ("user", "item")})
        self._noise = noise_generator(generator, "cpu")

    def assignment(self, side: str, h_t: torch.Tensor) -> torch.Tensor:
        """v = softmax(Linear(h_t)) for rows of one side: [B, K]."""
        return torch.softmax(self.assign[side](h_t), dim=-1)

    def group_level_loss(self, t, s, groups):
        n_all = 2 * self.n_groups
        if self.group_level == "second":
            with torch.no_grad():
                pt, present = group_means(t, groups, n_all)
                ps, _ = group_means(s.detach(), groups, n_all)
            pt, ps = normalize_rows(pt[present]), normalize_rows(ps[present])
            diff = normalize_rows(s) @ ps.T - normalize_rows(t) @ pt.T
            return (diff * diff).sum()
        with torch.no_grad():
            pt, present = group_means(t, groups, n_all)
        ps, _ = group_means(s, groups, n_all)
        pt, ps = normalize_rows(pt[present]), normalize_rows(ps[present])
        diff = ps @ ps.T - pt @ pt.T
        return (diff * diff).sum()

    def forward(self, student_user, student_item, users, pos, neg):
        check_student(student_user, student_item, self.teacher_user, self.teacher_item, self.student_dim)
        check_batch(users, pos, neg)
        u, i = batch_entities(users, pos, neg)
        dtype = student_user.dtype
        parts = {"user": (self.teacher_user[u].to(dtype), student_user[u]),
                 "item": (self.teacher_item[i].to(dtype), student_item[i])}
        ga = 0.0
        group_ids = []
        for k, side in enumerate(("user", "item")):
            h_t, h_s = parts[side]
            v = self.assignment(side, h_t)
            group_ids.append(v.detach().argmax(dim=1) + k * self.n_groups)
            if self.alpha < 1:  # alpha = 1: no GA term (and no expert evaluation)
                z = gumbel_softmax(v, self.tau, self._noise)
                hhat = self.experts[side].mixture(h_s, z, self.selected_only())
                ga = ga + ((h_t - hhat) ** 2).sum()
        t = torch.cat([parts["user"][0], parts["item"][0]])
        s = torch.cat([parts["user"][1], parts["item"][1]])
        groups = torch.cat(group_ids)
        ent = grouped_topology_loss(t, s, groups, 2 * self.n_groups, teacher_cos_filter=self.teacher_cos_filter,
                                    backend=self.backend)
        grp = self.group_level_loss(t, s, groups)
        return self.lambda_td * (self.alpha * (ent + grp) + (1 - self.alpha) * ga)
