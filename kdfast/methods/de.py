"""DE - Distillation Experts (Kang et al., CIKM'20); docs/METHODS.md section 2.

Per side (users, items) M experts map the student's representation h_s to the frozen teacher's h_t,
chosen by a selection network on the TEACHER representation through a Gumbel-softmax whose
temperature is annealed over the epochs:

    alpha_e = softmax(W h_t_e + b)
    z_e = softmax((log(alpha_e + 1e-10) + g) / tau),   g ~ Gumbel(0, 1) i.i.d.
    hhat_e = sum_m z_em E_m(h_s_e);   l(e) = ||h_t_e - hhat_e||^2
    L = lambda_de * (sum_{unique users} l + 0.5 (sum_{unique pos} l + sum_{unique neg} l))

E_m: two-layer experts (kdfast.methods.experts.ExpertBank), d_s -> (d_s + d_t) // 2 -> d_t, and
d_s -> d_t // 2 -> d_t when d_s == d_t (self-distillation), as in the authors' code; tau =
temperature(epoch, max_epoch, tau0, tau_end, tau_delay) = tau0 * tau_end^(max(epoch - tau_delay,
0) / max_epoch), set by start_epoch (tau0 before the first call). The formula is the authors';
their loop holds tau0 one epoch longer (tau_delay=1 reproduces it; kdfast's default is 0: see
kdfast.methods.experts.temperature). The experts and selectors exist only during training:
the trainer optimises them with the student and drops the method afterwards.
"""

from __future__ import annotations

import torch

from .._core import checks
from .._core.numerics import gather_rows
from .base import checked_options
from .experts import (
    AnnealedMethod,
    ExpertBank,
    gumbel_softmax,
    make_linear,
    noise_generator,
    per_side,
)


class DE(AnnealedMethod):
    """Distillation Experts: the teacher's representations regressed through Gumbel-selected
    experts.

    Options (defaults): n_experts M (30), lambda_de (0.01), tau0 (1.0), tau_end (1e-10),
    tau_delay (0; 1 = the authors' schedule, one epoch later), select_only_below: when set and
    tau < it, each row evaluates only its argmax expert, weighted by its z (an approximation that
    drops the other experts' z, all below exp(-gap / tau)); None (the default) evaluates the exact
    mixture.
    """

    name = "de"
    option_rules = {
        **AnnealedMethod.option_rules,
        "n_experts": checks.positive_int,
        "lambda_de": checks.positive_number,
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
        n_experts=30,
        lambda_de=0.01,
        tau0=1.0,
        tau_end=1e-10,
        tau_delay=0,
        select_only_below=None,
    ):
        method = cls(
            teacher_user, teacher_item, student_dim, tau0, tau_end, select_only_below, tau_delay
        )
        method.lambda_de = lambda_de
        d_t, d_s = teacher_user.shape[1], method.student_dim
        hidden = d_t // 2 if d_t == d_s else None  # the authors' experts for self-distillation
        # drawn in this order from the generator: experts (user, item), selectors, the noise seed
        method.experts = per_side(lambda: ExpertBank(n_experts, d_s, d_t, generator, hidden))
        method.selectors = per_side(lambda: make_linear(d_t, n_experts, generator))
        method._noise = noise_generator(generator, "cpu")
        return method

    def reconstruct(self, side: str, h_t: torch.Tensor, h_s: torch.Tensor, sizes=None):
        """hhat for rows of one side ("user" or "item"): [B, d_t]. sizes: the rows are that many
        consecutive blocks (the unique positive items, then the unique negative items) whose Gumbel
        noise is drawn block after block, as separate calls would draw it; the experts then run
        once over all of them."""
        alpha = torch.softmax(self.selectors[side](h_t), dim=-1)
        if sizes is None:
            z = gumbel_softmax(alpha, self.tau, self._noise)
        else:
            blocks = torch.split(alpha, list(sizes))
            z = torch.cat([gumbel_softmax(a, self.tau, self._noise) for a in blocks])
        return self.experts[side].mixture(h_s, z, self.selected_only())

    def forward(self, student_user, student_item, users, pos, neg):
        """lambda_de * (sum_{unique users} l + 0.5 (sum_{unique pos} l + sum_{unique neg} l)):
        one expert evaluation per side, the unique positive and negative items stacked (an item in
        both counts twice, as in the sum)."""
        self.check_batch(student_user, student_item, users, pos, neg)
        u = torch.unique(users)
        ip, ineg = torch.unique(pos), torch.unique(neg)
        items = torch.cat([ip, ineg])
        dtype = student_user.dtype
        h_t = self.teacher_user.index_select(0, u).to(dtype)
        loss = ((h_t - self.reconstruct("user", h_t, gather_rows(student_user, u))) ** 2).sum()
        h_t = self.teacher_item.index_select(0, items).to(dtype)
        hhat = self.reconstruct("item", h_t, gather_rows(student_item, items), (len(ip), len(ineg)))
        return self.lambda_de * (loss + 0.5 * ((h_t - hhat) ** 2).sum())
