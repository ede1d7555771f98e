"""IR-RRD - RRD with the item-side ranking regulariser (Kang et al., Information Sciences'21);
docs/METHODS.md section 6.

RRD's loss (kdfast.methods.rrd) plus the same loss with users and items swapped: each item's teacher
top-N_I users (users who interacted with the item excluded), K_I interesting positions and L_I
uninteresting users sampled per epoch, and the relaxed Plackett-Luce loss of the student's item-user
scores, summed over the step's items I_b:

    L = lam * sum_{u in U_b} L_RRD(u) + lam_ir * sum_{i in I_b} L_IR(i)

I_b: the unique items among the batch users' RRD samples (item_source="samples", the paper's choice)
or the batch's unique positive items (item_source="pos", cheaper; also used with sampling=False).
"""

from __future__ import annotations

import torch

from .._core import checks
from .._core.csr import transpose_csr
from .base import checked_options, choice, optional, teacher_top, unique_ids
from .rrd import RRD, RankingSide


class IRRRD(RRD):
    """IR-RRD: RRD plus the item-side ranking regulariser.

    Options: RRD's, plus K_I=20 interesting users, L_I=20 uninteresting users per item, N_I (length
    of each item's teacher list of users; None: N), lam_ir=0.0005, item_source="samples" or "pos"
    (see the module docstring).
    forward returns lam * L_RRD + lam_ir * L_IR.
    """

    name = "ir-rrd"
    option_rules = {
        **RRD.option_rules,
        "K_I": checks.positive_int,
        "L_I": checks.positive_int,
        "N_I": optional(checks.positive_int),
        "lam_ir": checks.positive_number,
        "item_source": choice("samples", "pos"),
    }

    @classmethod
    def check_relations(cls, options, label):
        super().check_relations(options, label)
        n_i = options["N"] if options["N_I"] is None else options["N_I"]
        if n_i < options["K_I"]:
            raise ValueError(f"{label}: N_I ({n_i}) must be >= K_I ({options['K_I']})")

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
        N=500,
        K=40,
        L=40,
        T=10.0,
        lam=1e-3,
        K_I=20,
        L_I=20,
        N_I=None,
        lam_ir=5e-4,
        item_source="samples",
        sampling=True,
        backend="auto",
    ):
        n_users, n_items, excl, top = cls._user_knowledge(
            teacher_user, teacher_item, train, N, backend
        )
        N_I = N if N_I is None else N_I
        excl_t = transpose_csr(excl, n_items, n_users)
        top_t = teacher_top(teacher_item, teacher_user, N_I, excl_t, backend, what="N_I")
        side = RankingSide(top, excl, n_items, K, L, T, backend)
        method = cls(side, n_users, n_items, lam, sampling, backend, generator)
        method.item_side = RankingSide(top_t, excl_t, n_users, K_I, L_I, T, backend)
        method.lam_ir = lam_ir
        method.item_source = item_source
        method._resample()
        return method

    def _resample(self):
        super()._resample()
        if hasattr(self, "item_side"):
            self.item_side.resample(self.generator)

    def forward(self, student_user, student_item, users, pos, neg):
        self.check_batch(student_user, student_item, users, pos, neg)
        ub = unique_ids(users, self.n_users)
        loss = self.lam * self._user_loss(student_user, student_item, ub)
        if self.item_source == "pos" or not self.sampling:
            items = unique_ids(pos, self.n_items)
        else:
            # the batch users' sample rows by index_select (advanced indexing costs ~10x more)
            rows = self.user_side.sample_rows(ub)
            items = unique_ids(torch.cat(rows, 1).flatten(), self.n_items)
        return loss + self.lam_ir * self.item_side.loss(student_item, student_user, items)
