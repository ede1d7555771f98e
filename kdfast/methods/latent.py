"""Latent-knowledge distillation: DE (Distillation Experts, CIKM'20) and PHR (Personalized Hint
Regression, KBS'22), docs/METHODS.md sections 2 and 3.

Both regress the frozen teacher's representation h_t of every unique batch entity from the student's
h_s through trainable maps that exist only during training: the trainer optimises them with the student
and drops the method afterwards (the method holds the teacher as non-persistent buffers and never stores
the student, so the student alone remains).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._core import checks as _checks
from .base import KDMethod


# ---------------------------------------------------------------- shared pieces
def temperature(epoch: int, max_epoch: int, tau0: float = 1.0, tau_end: float = 1e-10) -> float:
    """Gumbel-softmax temperature of an epoch: tau0 * tau_end^(epoch / max_epoch), floored at tau_end.

    With the defaults this is the authors' schedule tau_e = 1.0 * (1e-10)^(e / max_epoch).
    """
    if max_epoch < 1:
        raise ValueError(f"max_epoch must be >= 1, got {max_epoch}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return max(tau0 * tau_end ** (epoch / max_epoch), tau_end)


def uniform_init_(t: torch.Tensor, fan_in: int, generator=None) -> torch.Tensor:
    """nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) init, reproducible through `generator`."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        noise = torch.rand(t.shape, generator=generator, dtype=t.dtype)
        t.copy_((noise * 2 - 1) * bound)
    return t


def make_linear(d_in: int, d_out: int, generator=None) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    uniform_init_(lin.weight, d_in, generator)
    uniform_init_(lin.bias, d_in, generator)
    return lin


def gumbel_softmax(probs: torch.Tensor, tau: float, generator=None) -> torch.Tensor:
    """softmax((log(probs + 1e-10) + g) / tau), g ~ Gumbel(0, 1) i.i.d. (the authors' form)."""
    gen_device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape, generator=generator, device=gen_device, dtype=probs.dtype).to(probs.device)
    g = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    return torch.softmax((torch.log(probs + 1e-10) + g) / tau, dim=-1)


class ExpertBank(nn.Module):
    """M two-layer experts E_m(x) = W2_m relu(W1_m x + b1_m) + b2_m (d_in -> (d_in+d_out)//2 -> d_out),
    stored as stacked weights and evaluated together with two einsums (no Python loop over experts).
    """

    def __init__(self, n_experts: int, d_in: int, d_out: int, generator=None):
        super().__init__()
        hidden = (d_in + d_out) // 2
        self.w1 = nn.Parameter(uniform_init_(torch.empty(n_experts, d_in, hidden), d_in, generator))
        self.b1 = nn.Parameter(uniform_init_(torch.empty(n_experts, hidden), d_in, generator))
        self.w2 = nn.Parameter(uniform_init_(torch.empty(n_experts, hidden, d_out), hidden, generator))
        self.b2 = nn.Parameter(uniform_init_(torch.empty(n_experts, d_out), hidden, generator))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_m weights[:, m] E_m(x[b]): x [B, d_in], weights [B, M] -> [B, d_out]."""
        hid = torch.relu(torch.einsum("bi,mih->bmh", x, self.w1) + self.b1)
        out = torch.einsum("bmh,mho->bmo", hid, self.w2) + self.b2
        return torch.einsum("bm,bmo->bo", weights, out)

    def mixture(self, x: torch.Tensor, weights: torch.Tensor, selected_only: bool = False) -> torch.Tensor:
        """forward(x, weights); with selected_only, only each row's largest-weight expert is evaluated
        (weights[b, m*] E_m*(x[b]), m* = argmax_m weights[b, m]): M times cheaper, and equal to forward
        when the weights are one-hot (the Gumbel-softmax at a small temperature)."""
        if selected_only:
            w, idx = weights.max(dim=-1)
            return self.forward_selected(x, idx, w)
        return self(x, weights)

    def forward_selected(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """weight[b] E_{index[b]}(x[b]): only the selected expert of each row is evaluated.

        Rows are grouped by expert (one stable sort) and each present expert runs one matmul over its
        rows: reading each expert's weights once, instead of gathering a [B, d_in, hidden] copy of them.
        """
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=self.w1.shape[0]).tolist()
        xs = x[order]
        parts = []
        start = 0
        for m, c in enumerate(counts):
            if c:
                h = torch.relu(xs[start:start + c] @ self.w1[m] + self.b1[m])
                parts.append(h @ self.w2[m] + self.b2[m])
                start += c
        out = torch.empty((x.shape[0], self.w2.shape[2]), dtype=x.dtype, device=x.device)
        out = out.index_copy(0, order, torch.cat(parts)) if parts else out
        return weight[:, None] * out


def check_teacher(teacher_user, teacher_item):
    _checks.floating(teacher_user, "teacher_user", ndim=2)
    _checks.floating(teacher_item, "teacher_item", ndim=2)
    if teacher_user.shape[1] != teacher_item.shape[1]:
        raise ValueError(f"teacher_user and teacher_item must have the same dimension, got "
                         f"{teacher_user.shape[1]} and {teacher_item.shape[1]}")


def check_student(student_user, student_item, teacher_user, teacher_item, student_dim=None):
    _checks.floating(student_user, "student_user", ndim=2)
    _checks.floating(student_item, "student_item", ndim=2)
    if student_user.shape[0] != teacher_user.shape[0]:
        raise ValueError(f"student_user has {student_user.shape[0]} rows but teacher_user has {teacher_user.shape[0]}")
    if student_item.shape[0] != teacher_item.shape[0]:
        raise ValueError(f"student_item has {student_item.shape[0]} rows but teacher_item has {teacher_item.shape[0]}")
    if student_dim is not None and (student_user.shape[1] != student_dim or student_item.shape[1] != student_dim):
        raise ValueError(f"student tables must have {student_dim} columns, got {student_user.shape[1]} and "
                         f"{student_item.shape[1]}")


def check_batch(users, pos, neg):
    for name, x in (("users", users), ("pos", pos), ("neg", neg)):
        _checks.integer(x, name, ndim=1)


def noise_generator(generator, device):
    """A private generator for the Gumbel noise, seeded from `generator` (None: the global RNG)."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def check_prob(v, name):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= float(v) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    return float(v)


def check_positive(v, name):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not float(v) > 0:
        raise ValueError(f"{name} must be a positive number, got {v!r}")
    return float(v)


def entity_weighted(loss_of, users, pos, neg, item_weight: float):
    """sum_{unique users} l + item_weight * (sum_{unique pos} l + sum_{unique neg} l)."""
    return (loss_of("user", torch.unique(users))
            + item_weight * (loss_of("item", torch.unique(pos)) + loss_of("item", torch.unique(neg))))


class TeacherMethod(KDMethod):
    """Base of the methods built from the frozen teacher's tables and the student dimension (DE, PHR, HTD):
    keeps the teacher as non-persistent buffers (dropped with the method after training)."""

    def __init__(self, teacher_user, teacher_item, student_dim: int):
        super().__init__()
        check_teacher(teacher_user, teacher_item)
        self.student_dim = _checks.positive_int(student_dim, "student_dim")
        self.register_buffer("teacher_user", teacher_user.detach(), persistent=False)
        self.register_buffer("teacher_item", teacher_item.detach(), persistent=False)

    @classmethod
    def build(cls, teacher_user, teacher_item, train, student_dim, *, generator=None, **options):
        return cls(teacher_user, teacher_item, student_dim, generator=generator, **options)


class AnnealedMethod(TeacherMethod):
    """A TeacherMethod with a Gumbel-softmax temperature annealed per epoch (DE, HTD):
    tau = temperature(epoch, max_epoch, tau0, tau_end), set by start_epoch (tau0 before the first call);
    select_only_below: once tau < it, expert mixtures evaluate only each row's selected expert."""

    def __init__(self, teacher_user, teacher_item, student_dim: int, tau0: float, tau_end: float,
                 select_only_below: float | None):
        super().__init__(teacher_user, teacher_item, student_dim)
        self.tau0, self.tau_end = check_positive(tau0, "tau0"), check_positive(tau_end, "tau_end")
        self.tau = self.tau0
        self.select_only_below = None if select_only_below is None else check_positive(select_only_below,
                                                                                       "select_only_below")

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        self.tau = temperature(epoch, max_epoch, self.tau0, self.tau_end)

    def selected_only(self) -> bool:
        """Whether to evaluate only the selected expert: tau fell below select_only_below."""
        return self.select_only_below is not None and self.tau < self.select_only_below


# ---------------------------------------------------------------- DE
class DE(AnnealedMethod):
    """Distillation Experts (docs/METHODS.md section 2): per side M experts map h_s -> h_t, chosen by a selection network on
    the TEACHER representation through a Gumbel-softmax with an annealed temperature.

        alpha_e = softmax(W h_t_e + b);  z_e = softmax((log(alpha_e + 1e-10) + g) / tau)
        hhat_e = sum_m z_em E_m(h_s_e);   l(e) = ||h_t_e - hhat_e||^2
        L = lambda * (sum_{unique users} l + 0.5 (sum_{unique pos} l + sum_{unique neg} l))
    tau = temperature(epoch, max_epoch) is set by start_epoch (1.0 before the first call).

    Args (build options): n_experts M (30), lambda_de (0.01), tau0 (1.0), tau_end (1e-10),
    select_only_below: when set and tau < it, each row evaluates only its argmax expert, weighted by its
    z (an approximation that drops the other experts' z, all below exp(-gap / tau)); default None (exact).
    """

    name = "de"

    def __init__(self, teacher_user, teacher_item, student_dim: int, *, n_experts: int = 30,
                 lambda_de: float = 0.01, tau0: float = 1.0, tau_end: float = 1e-10,
                 select_only_below: float | None = None, generator=None):
        super().__init__(teacher_user, teacher_item, student_dim, tau0, tau_end, select_only_below)
        n_experts = _checks.positive_int(n_experts, "n_experts")
        self.lambda_de = float(lambda_de)
        d_t = teacher_user.shape[1]
        self.experts = nn.ModuleDict({side: ExpertBank(n_experts, self.student_dim, d_t, generator)
                                      for side in ("user", "item")})
        self.selectors = nn.ModuleDict({side: make_linear(d_t, n_experts, generator) for side in ("user", "item")})
        self._noise = noise_generator(generator, "cpu")

    def reconstruct(self, side: str, h_t: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
        """hhat for rows of one side ("user" or "item"): [B, d_t]."""
        alpha = torch.softmax(self.selectors[side](h_t), dim=-1)
        z = gumbel_softmax(alpha, self.tau, self._noise)
        return self.experts[side].mixture(h_s, z, self.selected_only())

    def forward(self, student_user, student_item, users, pos, neg):
        check_student(student_user, student_item, self.teacher_user, self.teacher_item, self.student_dim)
        check_batch(users, pos, neg)
        tables = {"user": (self.teacher_user, student_user), "item": (self.teacher_item, student_item)}

        def loss_of(side, ids):
            t, s = tables[side]
            h_t = t[ids].to(s.dtype)
            return ((h_t - self.reconstruct(side, h_t, s[ids])) ** 2).sum()

        return self.lambda_de * entity_weighted(loss_of, users, pos, neg, 0.5)


# ---------------------------------------------------------------- PHR
class PersonalizationNet(nn.Module):
    """PHR's default personalization network: d_t -> d_t + d_s d_t -> relu -> d_s d_t (docs/METHODS.md section 3)."""

    def __init__(self, d_t: int, d_s: int, generator=None):
        super().__init__()
        hidden = d_t + d_s * d_t
        self.net = nn.Sequential(make_linear(d_t, hidden, generator), nn.ReLU(), make_linear(hidden, d_s * d_t, generator))

    def forward(self, h_t):
        return self.net(h_t)


class PHR(TeacherMethod):
    """Personalized Hint Regression (docs/METHODS.md section 3): each entity gets its own map W_e = reshape(PNet(h_t_e),
    [d_t, d_s]); hhat_e = W_e h_s_e; l(e) = ||h_t_e - hhat_e||^2; DE's entity weighting; lambda 0.01.

    Args (build options): lambda_phr (0.01); pnet: any nn.Module mapping [B, d_t] -> [B, d_t * d_s]
    (default PersonalizationNet, shared by users and items; the paper's exact input is unverified, so the
    network is replaceable). PHR has no temperature: start_epoch does nothing.
    """

    name = "phr"

    def __init__(self, teacher_user, teacher_item, student_dim: int, *, lambda_phr: float = 0.01,
                 pnet: nn.Module | None = None, generator=None):
        super().__init__(teacher_user, teacher_item, student_dim)
        self.lambda_phr = float(lambda_phr)
        d_t = teacher_user.shape[1]
        if pnet is not None and not isinstance(pnet, nn.Module):
            raise TypeError(f"pnet must be a torch.nn.Module, got {type(pnet).__name__}")
        self.pnet = pnet if pnet is not None else PersonalizationNet(d_t, self.student_dim, generator)

    def forward(self, student_user, student_item, users, pos, neg):
        check_student(student_user, student_item, self.teacher_user, self.teacher_item, self.student_dim)
        check_batch(users, pos, neg)
        tables = {"user": (self.teacher_user, student_user), "item": (self.teacher_item, student_item)}
        d_t, d_s = self.teacher_user.shape[1], self.student_dim

        def loss_of(side, ids):
            t, s = tables[side]
            h_t = t[ids].to(s.dtype)
            w = self.pnet(h_t)
            if w.shape != (ids.shape[0], d_t * d_s):
                raise ValueError(f"pnet must return [B, {d_t * d_s}] (d_t * d_s), got {tuple(w.shape)}")
            hhat = torch.bmm(w.view(-1, d_t, d_s), s[ids][:, :, None])[:, :, 0]
            return ((h_t - hhat) ** 2).sum()

        return self.lambda_phr * entity_weighted(loss_of, users, pos, neg, 0.5)
