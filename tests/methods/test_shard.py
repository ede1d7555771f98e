"""KDMethod.shard_users: a data-parallel rank's share of a method's per-epoch work (no processes
needed; the two-process runs are in tests/test_distributed_distill.py).

For each method that shards, rank r of 2 keeps the users u with u % 2 == r:
- every sampled id of its row j comes from the teacher list of user 2 j + r (the rows line up);
- its loss and gradients on a batch of its users equal those of the unsharded method whose sample
  tables hold the rank's samples at those users' rows (the forward is unchanged by sharding);
- the two ranks draw from different generators, a user of the other rank is refused, and a method
  that does not shard is left as it was; HetComp refuses to shard without a sum over the ranks.
"""

import pytest
import torch

from kdfast.methods.registry import method_class

from ._helpers import teacher_setup

N_USERS, N_ITEMS = 24, 90
# small-catalog options; rd with warmup 0 so that its first epoch estimates ranks
OPTIONS = {
    "rrd": {"N": 30, "K": 6, "L": 6},
    "ir-rrd": {"N": 30, "K": 6, "L": 6, "N_I": 12, "K_I": 4, "L_I": 4},
    "cd": {"N": 40, "K": 6},
    "unkd": {"n": 15, "G": 3, "S": 6},
    "rd": {"K": 6, "n_sample": 20, "warmup": 0},
    "dcd": {"N": 20, "K": 6, "N_I": 10, "K_I": 4},
}


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, path, value):
    head, _, last = path.rpartition(".")
    setattr(_get(obj, head) if head else obj, last, value)


# per method: (per-user sample tables, filled per rank; tables of the other side, whole on every
# rank; (sampled ids, the teacher list they come from) pairs)
TABLES = {
    "rrd": (
        ["user_side.interesting", "user_side.uninteresting"],
        [],
        [("user_side.interesting", "user_side.top")],
    ),
    "ir-rrd": (
        ["user_side.interesting", "user_side.uninteresting"],
        ["item_side.interesting", "item_side.uninteresting"],
        [("user_side.interesting", "user_side.top")],
    ),
    "cd": (["items", "labels"], [], [("items", "top")]),
    "unkd": (["pos_items", "neg_items"], [], [("pos_items", "top"), ("neg_items", "top")]),
    "rd": (["weights"], [], []),
    "dcd": (
        ["user_side.under", "user_side.over_ids"],
        ["item_side.under", "item_side.over_ids"],
        [("user_side.under", "user_side.teacher"), ("user_side.over_ids", "user_side.teacher")],
    ),
}


def _build(name, seed=0):
    tu, ti, train, _ = teacher_setup(N_USERS, N_ITEMS)
    cls, defaults = method_class(name)
    g = torch.Generator().manual_seed(seed)
    return cls.build(tu, ti, train, 4, generator=g, **{**defaults, **OPTIONS.get(name, {})})


def _student(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_USERS, 4, generator=g), torch.randn(N_ITEMS, 4, generator=g)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_rank_share_lines_up_and_computes_the_same_loss(name):
    rows, whole, sourced = TABLES[name]
    su, si = _student()
    ref = _build(name)
    ref.start_epoch(0, 5, su, si)
    shards = []
    for rank in (0, 1):
        m = _build(name)
        assert m.shard_users(rank, 2) is True and m.user_shard == (rank, 2)
        m.start_epoch(0, 5, su, si)
        shards.append(m)
        own = torch.arange(rank, N_USERS, 2)
        for ids, source in sourced:  # row j's samples come from user 2 j + rank's teacher list
            got, lists = _get(m, ids), _get(ref, source)
            assert got.shape[0] == own.numel()
            for j, u in enumerate(own.tolist()):
                s = got[j].reshape(-1)
                s = s[s >= 0]
                assert torch.isin(s, lists[u].reshape(-1)).all(), (ids, u)
        # the unsharded method holding the rank's samples at its users' rows ...
        for path in rows:
            full = _get(ref, path).clone()
            full[own] = _get(m, path).to(full.dtype)
            _set(ref, path, full)
        for path in whole:
            _set(ref, path, _get(m, path))
        # ... gives the loss and the gradients of the rank on a batch of its users
        g = torch.Generator().manual_seed(7 + rank)
        users = own[torch.randint(0, own.numel(), (20,), generator=g)]
        pos, neg = torch.randint(0, N_ITEMS, (2, 20), generator=g)
        grads = []
        for method in (m, ref):
            a, b = su.clone().requires_grad_(), si.clone().requires_grad_()
            loss = method(a, b, users, pos, neg)
            loss.backward()
            grads.append((loss.detach(), a.grad, b.grad))
        for x, y in zip(*grads):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        assert grads[0][0] > 0
        with pytest.raises(ValueError, match="belongs to another rank"):
            m(su, si, torch.tensor([1 - rank]), pos[:1], neg[:1])
    g0, g1 = (s.generator for s in shards)
    assert g0.initial_seed() != g1.initial_seed()  # the ranks' streams are their own


def test_rd_shard_keeps_its_users_lists_and_exclusions():
    ref, m = _build("rd"), _build("rd")
    m.shard_users(1, 3)
    own = torch.arange(1, N_USERS, 3)
    assert torch.equal(m.top, ref.top[own])
    keys, counts = ref.excl_keys
    rows = keys // N_ITEMS
    want = (rows[rows % 3 == 1] // 3) * N_ITEMS + keys[rows % 3 == 1] % N_ITEMS
    assert torch.equal(m.excl_keys[0], want) and torch.equal(m.excl_keys[1], counts[own])
    su, si = _student()
    m.start_epoch(0, 5, su, si)  # its rank samples never hit a training item of the row's user
    samples = m.rank_samples
    for j, u in enumerate(own.tolist()):
        trained = keys[rows == u] % N_ITEMS
        assert not torch.isin(samples[j], trained).any()


@pytest.mark.parametrize("name", ["de", "rrd-full"])
def test_methods_that_do_not_shard_stay_whole(name):
    opts = {"rrd-full": {"N": 30, "K": 6}}
    tu, ti, train, _ = teacher_setup(N_USERS, N_ITEMS)
    cls, defaults = method_class(name)
    g = torch.Generator().manual_seed(0)
    m = cls.build(tu, ti, train, 4, generator=g, **{**defaults, **opts.get(name, {})})
    assert m.shard_users(0, 2) is False and m.user_shard is None


def test_shard_arguments_are_checked():
    m = _build("rrd")
    with pytest.raises(ValueError, match="rank must be in"):
        m.shard_users(2, 2)
    with pytest.raises(ValueError, match="world"):
        m.shard_users(0, 0)
    m.shard_users(0, 2)
    with pytest.raises(RuntimeError, match="already"):
        m.shard_users(0, 2)


def test_hetcomp_needs_a_sum_over_the_ranks():
    """HetComp's phase is decided over every user: sharding it needs all_sum (the two-process
    check is tests/test_distributed_distill.py::test_hetcomp_shards_its_knowledge_construction)."""
    tu, ti, train, _ = teacher_setup(N_USERS, N_ITEMS)
    cls, defaults = method_class("hetcomp")
    m = cls.build(tu, ti, train, 4, **{**defaults, "K": 60, "dcg_k": 20})
    with pytest.raises(ValueError, match="all_sum"):
        m.shard_users(0, 2)
    assert m.user_shard is None
