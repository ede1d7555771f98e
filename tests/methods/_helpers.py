"""Helpers shared by the method tests: a random teacher with training interactions, and a KD-only loop."""
import torch


def teacher_setup(U=24, I=90, dt=12, per_user=4, seed=0):
    """Random teacher tables [U, dt], [I, dt], a CSR of `per_user` random training items per user, and the
    generator that drew them (to be used further by the test)."""
    g = torch.Generator().manual_seed(seed)
    tu, ti = torch.randn(U, dt, generator=g), torch.randn(I, dt, generator=g)
    train = torch.cat([torch.randperm(I, generator=g)[:per_user] for _ in range(U)])
    indptr = torch.arange(0, per_user * U + 1, per_user)
    return tu, ti, (indptr, train), g


def train_kd_alone(m, su, si, users, pos, neg, epochs=60, lr=0.05):
    """Adam on the student tables with the method's loss alone, start_epoch before each step."""
    opt = torch.optim.Adam([su, si], lr=lr)
    for epoch in range(epochs):
        m.start_epoch(epoch, epochs, su.detach(), si.detach())
        opt.zero_grad()
        m(su, si, users, pos, neg).backward()
        opt.step()


def top_overlap(su, si, teacher_top, train):
    """Mean share of each user's teacher list (teacher_top [U, k]) found in the student's top k (training
    items excluded)."""
    import kdfast

    with torch.no_grad():
        _, idx = kdfast.topk_scores(su, si, teacher_top.shape[1], exclude=train, backend="torch")
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, teacher_top)) / teacher_top.numel()


def assert_finite_loss_with_gradient(loss, su, si):
    """A scalar, finite, positive KD loss whose backward gives finite, non-zero gradients to both tables."""
    assert loss.dim() == 0 and bool(torch.isfinite(loss)) and loss.item() > 0
    loss.backward()
    assert bool(torch.isfinite(su.grad).all()) and su.grad.abs().sum() > 0
    assert bool(torch.isfinite(si.grad).all()) and si.grad.abs().sum() > 0


def assert_rejects_bad_batches(m, su, si):
    """The batch checks every method shares: ragged (users, pos, neg), a user id out of range, and student
    tables of the wrong size each raise ValueError naming the problem."""
    import pytest

    one = torch.tensor([0])
    with pytest.raises(ValueError, match="same length"):
        m(su, si, torch.tensor([0, 1]), one, one)
    with pytest.raises(ValueError, match="users"):
        m(su, si, torch.tensor([su.shape[0]]), one, one)
    with pytest.raises(ValueError, match="student"):
        m(su[:5], si, one, one, one)
    with pytest.raises(ValueError, match="student"):
        m(su, si[:5], one, one, one)
