"""HTD - Hierarchical Topology Distillation (Kang et al., KDD'21); docs/METHODS.md section 4.

Entities V and their rows t, s as in FTD. Per side (users, items) a group assignment network
v(h_t) = softmax(Linear(d_t -> K)); the hard group of an entity is z_e = argmax v (no gradient),
item groups offset by K (2K groups in all).

  L_ent: kdfast.ops.topology.grouped_topology_loss over V with those groups (the pairs in one group,
         and with teacher cosine > 0 when teacher_cos_filter, the authors' default).
  L_grp: 'second' (default): sum_{g present} sum_{a in V} (cos(P_s_g, s_a) - cos(P_t_g, t_a))^2
         with the group-mean prototypes P_t, P_s computed WITHOUT gradient (the authors' quirk).
         'first': sum_{g, h present} (cos(P_s_g, P_s_h) - cos(P_t_g, P_t_h))^2; here the student
         prototypes DO carry gradient (deviation: without it this term would be a constant).
  L_GA:  DE-style reconstruction with K experts per side and the Gumbel-softmax of v (annealed
         tau), summed over V (users and items alike, no 0.5 item weight); it trains the assignment
         networks.
  L = lambda_td * (alpha (L_ent + L_grp) + (1 - alpha) L_GA).
"""

from __future__ import annotations

import torch

from .._core import checks
from .._core.numerics import gather_rows, normalize_rows
from ..ops.topology import grouped_topology_loss
from .base import BACKEND, batch_entities, checked_options, choice
from .experts import (
    AnnealedMethod,
    ExpertBank,
    gumbel_softmax,
    make_linear,
    noise_generator,
    per_side,
)

GROUP_LEVELS = ("second", "first")


def group_means(x: torch.Tensor, groups: torch.Tensor, n_groups: int):
    """([n_groups, d] mean row of each group (0 for empty groups), [n_groups] bool present).

    A one-hot matmul rather than index_add, so the result is deterministic on every device.
    """
    onehot = (groups[None, :] == torch.arange(n_groups, device=x.device)[:, None]).to(x.dtype)
    counts = onehot.sum(1)
    present = counts > 0
    return (onehot @ x) / counts.clamp(min=1)[:, None], present


class HTD(AnnealedMethod):
    """Hierarchical Topology Distillation: entity-level topology within teacher-assigned groups, the
    group-level topology of their prototypes, and a DE-style term that trains the assignment.

    Options (defaults): n_groups K (30), alpha (0.5), lambda_td (0.001), group_level ("second"),
    teacher_cos_filter (True), tau0 (1.0), tau_end (1e-10), tau_delay (0; 1 holds tau0 one epoch
    longer, as the DE authors' loop does: see kdfast.methods.experts.temperature),
    select_only_below (None: as in DE, once tau falls below it the GA term evaluates only each
    entity's selected expert), backend ("auto").
    """

    name = "htd"
    option_rules = {
        **AnnealedMethod.option_rules,
        "n_groups": checks.positive_int,
        "alpha": checks.probability,
        "lambda_td": checks.positive_number,
        "group_level": choice(*GROUP_LEVELS),
        "teacher_cos_filter": checks.boolean,
        "backend": BACKEND,
    }

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
        n_groups=30,
        alpha=0.5,
        lambda_td=0.001,
        group_level="second",
        teacher_cos_filter=True,
        tau0=1.0,
        tau_end=1e-10,
        tau_delay=0,
        select_only_below=None,
        backend="auto",
    ):
        method = cls(
            teacher_user, teacher_item, student_dim, tau0, tau_end, select_only_below, tau_delay
        )
        method.n_groups, method.alpha, method.lambda_td = n_groups, alpha, lambda_td
        method.group_level, method.teacher_cos_filter = group_level, teacher_cos_filter
        method.backend = backend
        d_t, d_s = teacher_user.shape[1], method.student_dim
        # drawn in this order from the generator: assigners (user, item), experts, the noise seed
        method.assign = per_side(lambda: make_linear(d_t, n_groups, generator))
        method.experts = per_side(lambda: ExpertBank(n_groups, d_s, d_t, generator))
        method._noise = noise_generator(generator, "cpu")
        return method

    def assignment(self, side: str, h_t: torch.Tensor) -> torch.Tensor:
        """v = softmax(Linear(h_t)) for rows of one side: [B, K]."""
        return torch.softmax(self.assign[side](h_t), dim=-1)

    def group_level_loss(self, t, s, groups):
        """L_grp of the entities' rows t, s [|V|, d] and their groups [|V|] (see the module
        docstring)."""
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
        self.check_batch(student_user, student_item, users, pos, neg)
        u, i = batch_entities(users, pos, neg)
        dtype = student_user.dtype
        parts = {
            "user": (self.teacher_user.index_select(0, u).to(dtype), gather_rows(student_user, u)),
            "item": (self.teacher_item.index_select(0, i).to(dtype), gather_rows(student_item, i)),
        }
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
        ent = grouped_topology_loss(
            t,
            s,
            groups,
            2 * self.n_groups,
            teacher_cos_filter=self.teacher_cos_filter,
            backend=self.backend,
        )
        grp = self.group_level_loss(t, s, groups)
        return self.lambda_td * (self.alpha * (ent + grp) + (1 - self.alpha) * ga)
