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
