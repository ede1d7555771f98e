"""What DE, PHR and HTD share: reproducible initialisation of their maps, the bank of two-layer
experts, the Gumbel-softmax with its private noise generator, and the annealed temperature (DE,
HTD).

Initialisation draws from the method's generator in a fixed order (build's order of construction),
so a seeded build gives the same maps on every run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._core import checks
from .base import FrozenTeacher, optional


def temperature(
    epoch: int, max_epoch: int, tau0: float = 1.0, tau_end: float = 1e-10, delay: int = 0
) -> float:
    """Gumbel-softmax temperature of an epoch (0-based): tau0 * tau_end^(e / max_epoch) with
    e = max(epoch - delay, 0), floored at tau_end.

    The formula is the DE paper's and its authors' code's (tau0 = 1, tau_end = 1e-10). Their
    training loop sets the temperature of epoch e >= 1 after epoch e - 1 from that epoch's index,
    so it holds tau0 for epochs 0 AND 1 and reaches kdfast's value one epoch later: delay=1
    reproduces it; kdfast's default, delay=0, anneals from the first epoch on.
    """
    if max_epoch < 1:
        raise ValueError(f"max_epoch must be >= 1, got {max_epoch}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    e = max(epoch - delay, 0)
    return max(tau0 * tau_end ** (e / max_epoch), tau_end)


def uniform_init_(t: torch.Tensor, fan_in: int, generator=None) -> torch.Tensor:
    """nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) init, reproducible through
    `generator`."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        noise = torch.rand(t.shape, generator=generator, dtype=t.dtype)
        t.copy_((noise * 2 - 1) * bound)
    return t


def make_linear(d_in: int, d_out: int, generator=None) -> nn.Linear:
    """nn.Linear(d_in, d_out) with weight, then bias, drawn by uniform_init_ from `generator`."""
    lin = nn.Linear(d_in, d_out)
    uniform_init_(lin.weight, d_in, generator)
    uniform_init_(lin.bias, d_in, generator)
    return lin


def gumbel_softmax(probs: torch.Tensor, tau: float, generator=None) -> torch.Tensor:
    """softmax((log(probs + 1e-10) + g) / tau), g ~ Gumbel(0, 1) i.i.d. (the authors' form)."""
    gen_device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape, generator=generator, device=gen_device, dtype=probs.dtype)
    u = u.to(probs.device)
    g = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    return torch.softmax((torch.log(probs + 1e-10) + g) / tau, dim=-1)


def noise_generator(generator, device):
    """A private generator for the Gumbel noise, seeded from `generator` (None: the global RNG)."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def per_side(make) -> nn.ModuleDict:
    """{"user": make(), "item": make()} as an nn.ModuleDict, built (and so drawn) in that order."""
    return nn.ModuleDict({side: make() for side in ("user", "item")})


class ExpertBank(nn.Module):
    """M two-layer experts E_m(x) = W2_m relu(W1_m x + b1_m) + b2_m (d_in -> hidden -> d_out;
    hidden = (d_in + d_out) // 2 unless given), stored as stacked weights w1 [M, d_in, hidden],
    b1 [M, hidden], w2 [M, hidden, d_out], b2 [M, d_out] and evaluated together, never with a
    Python loop over experts (forward_selected falls back to one when padding would waste more
    than it saves).
    """

    #: forward_selected pads each present expert's rows to the largest group; beyond this many
    #: padded rows per real row it evaluates one expert at a time instead
    max_padding = 4.0

    def __init__(
        self, n_experts: int, d_in: int, d_out: int, generator=None, hidden: int | None = None
    ):
        super().__init__()
        hidden = (d_in + d_out) // 2 if hidden is None else hidden

        def init(shape, fan_in):
            return nn.Parameter(uniform_init_(torch.empty(*shape), fan_in, generator))

        self.w1 = init((n_experts, d_in, hidden), d_in)
        self.b1 = init((n_experts, hidden), d_in)
        self.w2 = init((n_experts, hidden, d_out), hidden)
        self.b2 = init((n_experts, d_out), hidden)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_m weights[:, m] E_m(x[b]): x [B, d_in], weights [B, M] -> [B, d_out].

        Two GEMMs against the concatenated experts: H = relu(x [W1_1 .. W1_M] + [b1_1 .. b1_M])
        [B, M*hidden], each expert's block of H scaled by its weight, then
        (weights * H) [W2_1; ..; W2_M] + weights [b2_1; ..; b2_M]. The sum over experts is the
        second GEMM's reduction, so no [B, M, d_out] tensor is ever formed (it was the cost).
        """
        n, d_in = x.shape
        m, _, hid = self.w1.shape
        w1 = self.w1.transpose(0, 1).reshape(d_in, m * hid)
        h = torch.relu(torch.addmm(self.b1.reshape(m * hid), x, w1))
        hz = (h.view(n, m, hid) * weights[:, :, None]).view(n, m * hid)
        return torch.addmm(weights @ self.b2, hz, self.w2.reshape(m * hid, -1))

    def mixture(
        self, x: torch.Tensor, weights: torch.Tensor, selected_only: bool = False
    ) -> torch.Tensor:
        """forward(x, weights); with selected_only, only each row's largest-weight expert is
        evaluated (weights[b, m*] E_m*(x[b]), m* = argmax_m weights[b, m]): M times cheaper, and
        equal to forward when the weights are one-hot (the Gumbel-softmax at a small temperature).
        """
        if selected_only:
            w, idx = weights.max(dim=-1)
            return self.forward_selected(x, idx, w)
        return self(x, weights)

    def forward_selected(
        self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """weight[b] E_{index[b]}(x[b]): only the selected expert of each row is evaluated.

        One grouped computation: the rows are placed, grouped by expert, into a zero-padded
        [P, cap, d_in] block (P present experts, cap = the largest group; a row's slot is its
        expert's block and its rank within the group in a stable order), two batched matmuls
        (torch.baddbmm, each expert's weights read once) evaluate every present expert on its
        block, and each row reads its slot back. Padding rows never reach the output, so they get
        no gradient; the scatter and gather are index_copy / index_select at distinct slots, so the
        gradients have the same bits run to run. When padding would exceed max_padding rows per
        real row (very uneven groups) it evaluates one present expert at a time instead.
        """
        n = x.shape[0]
        m = self.w1.shape[0]
        if n == 0:
            return weight[:, None] * x.new_zeros((0, self.w2.shape[2]))
        counts = torch.bincount(index, minlength=m)
        present = torch.nonzero(counts).flatten()
        cap = int(counts.max())
        if present.numel() * cap > self.max_padding * n:
            return weight[:, None] * self._selected_loop(x, index, counts)
        # group g of a row: the rank of its expert among the present ones
        group = torch.cumsum(counts > 0, 0)[index] - 1
        order = torch.argsort(index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_group = torch.empty_like(index)
        rank_in_group[order] = torch.arange(n, device=x.device) - starts[index[order]]
        slot = group * cap + rank_in_group
        n_slots = present.numel() * cap
        xp = x.new_zeros((n_slots, x.shape[1])).index_copy(0, slot, x)
        xp = xp.view(present.numel(), cap, -1)
        b1, w1, b2, w2 = (p.index_select(0, present) for p in (self.b1, self.w1, self.b2, self.w2))
        h = torch.relu(torch.baddbmm(b1[:, None, :], xp, w1))
        out = torch.baddbmm(b2[:, None, :], h, w2)
        return weight[:, None] * out.view(n_slots, -1).index_select(0, slot)

    def _selected_loop(self, x, index, counts):
        """E_{index[b]}(x[b]) with one matmul per present expert over its rows."""
        order = torch.argsort(index, stable=True)
        xs = x[order]
        parts = []
        start = 0
        for m, c in enumerate(counts.tolist()):
            if c:
                h = torch.relu(xs[start : start + c] @ self.w1[m] + self.b1[m])
                parts.append(h @ self.w2[m] + self.b2[m])
                start += c
        out = x.new_empty((x.shape[0], self.w2.shape[2]))
        return out.index_copy(0, order, torch.cat(parts))


class AnnealedMethod(FrozenTeacher):
    """A FrozenTeacher with a Gumbel-softmax temperature annealed per epoch (DE, HTD):
    tau = temperature(epoch, max_epoch, tau0, tau_end, tau_delay), set by start_epoch (tau0 before
    the first call; tau_delay=1 is the authors' code, see temperature); select_only_below: once
    tau < it, expert mixtures evaluate only each row's selected expert.
    """

    option_rules = {
        "tau0": checks.positive_number,
        "tau_end": checks.positive_number,
        "tau_delay": checks.nonneg_int,
        "select_only_below": optional(checks.positive_number),
    }

    def __init__(
        self,
        teacher_user,
        teacher_item,
        student_dim,
        tau0,
        tau_end,
        select_only_below,
        tau_delay=0,
    ):
        super().__init__(teacher_user, teacher_item, student_dim)
        self.tau0, self.tau_end, self.select_only_below = tau0, tau_end, select_only_below
        self.tau_delay = tau_delay
        self.tau = tau0

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        self.tau = temperature(epoch, max_epoch, self.tau0, self.tau_end, self.tau_delay)

    def selected_only(self) -> bool:
        """Whether to evaluate only the selected expert: tau fell below select_only_below."""
        return self.select_only_below is not None and self.tau < self.select_only_below
