"""Helpers shared by the method tests: a random teacher with training interactions, and a KD-only
loop."""

import torch


def teacher_setup(n_users=24, n_items=90, dt=12, per_user=4, seed=0):
    """Random teacher tables [U, dt], [I, dt], a CSR of `per_user` random training items per user,
    and the generator that drew them (to be used further by the test)."""
    g = torch.Generator().manual_seed(seed)
    tu, ti = torch.randn(n_users, dt, generator=g), torch.randn(n_items, dt, generator=g)
    train = torch.cat([torch.randperm(n_items, generator=g)[:per_user] for _ in range(n_users)])
    indptr = torch.arange(0, per_user * n_users + 1, per_user)
    return tu, ti, (indptr, train), g


def entity_setup(d_t=12, d_s=4, n_u=20, n_i=30, seed=0, b=16, dtype=torch.float32):
    """Random teacher tables [n_u, d_t], [n_i, d_t], student tables [n_u, d_s], [n_i, d_s] (with
    gradient) and a batch of b (users, pos, neg), all drawn from one generator seeded with `seed`.
    """
    g = torch.Generator().manual_seed(seed)
    tu = torch.randn(n_u, d_t, generator=g, dtype=dtype)
    ti = torch.randn(n_i, d_t, generator=g, dtype=dtype)
    su = torch.randn(n_u, d_s, generator=g, dtype=dtype).requires_grad_()
    si = torch.randn(n_i, d_s, generator=g, dtype=dtype).requires_grad_()
    users = torch.randint(0, n_u, (b,), generator=g)
    pos, neg = torch.randint(0, n_i, (b,), generator=g), torch.randint(0, n_i, (b,), generator=g)
    return tu, ti, su, si, users, pos, neg


def cos_matrix(x, y):
    """[len(x), len(y)] cosine similarities of the rows."""
    return torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T


def batch_rows(tu, ti, su, si, users, pos, neg):
    """The teacher and student rows of a batch's entities (unique users, then unique items of pos
    and neg), and those users and items."""
    u, i = users.unique(), torch.cat([pos, neg]).unique()
    return torch.cat([tu[u], ti[i]]), torch.cat([su[u], si[i]]), u, i


def train_kd_alone(m, su, si, users, pos, neg, epochs=60, lr=0.05):
    """Adam on the student tables with the method's loss alone, start_epoch before each step."""
    opt = torch.optim.Adam([su, si], lr=lr)
    for epoch in range(epochs):
        m.start_epoch(epoch, epochs, su.detach(), si.detach())
        opt.zero_grad()
        m(su, si, users, pos, neg).backward()
        opt.step()


def top_overlap(su, si, teacher_top, train):
    """Mean share of each user's teacher list (teacher_top [U, k]) found in the student's top k
    (training items excluded)."""
    import kdfast

    with torch.no_grad():
        _, idx = kdfast.topk_scores(su, si, teacher_top.shape[1], exclude=train, backend="torch")
    return (
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, teacher_top))
        / teacher_top.numel()
    )


def assert_finite_loss_with_gradient(loss, su, si):
    """A scalar, finite, positive KD loss whose backward gives finite, non-zero gradients to both
    tables."""
    assert loss.dim() == 0 and bool(torch.isfinite(loss)) and loss.item() > 0
    loss.backward()
    assert bool(torch.isfinite(su.grad).all()) and su.grad.abs().sum() > 0
    assert bool(torch.isfinite(si.grad).all()) and si.grad.abs().sum() > 0
