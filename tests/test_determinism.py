"""Bitwise reproducibility of the gradients: the same bits run after run on 2 threads, and (C++
backend) the same bits on 1 thread, on cases big enough for every thread to get work."""

import contextlib

import pytest
import torch

import kdfast
from kdfast._core import backend
from kdfast._core.csr import with_ids
from kdfast.methods import registry
from kdfast.ops.full_catalog import cpu as full_catalog_cpu

pytestmark = pytest.mark.skipif(
    backend.ext() is None, reason="the C++ extension kdfast._C is not built"
)

REPEATS = 8


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _bits(*tensors):
    return tuple(
        t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors
    )


def _full_catalog_case():
    """B = 300 users, I = 5000 items, d = 32, K = 20 ranked ids (some padding), up to 50 exclusions
    a row."""
    g = torch.Generator().manual_seed(0)
    B, n_items, d, K = 300, 5000, 32, 20
    user, item = torch.randn(B, d, generator=g), torch.randn(n_items, d, generator=g)
    ranked = torch.randint(0, n_items, (B, K), generator=g)
    ranked[::7, -3:] = -1
    counts = torch.randint(0, 50, (B,), generator=g)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    indices = torch.randint(0, n_items, (int(indptr[-1]),), generator=g)
    return user, item, ranked, (indptr, indices)


def _repeat(f):
    """f's bits REPEATS times on 2 threads and once on 1 thread."""
    with _threads(2):
        two = [_bits(*f()) for _ in range(REPEATS)]
    with _threads(1):
        one = _bits(*f())
    return two, one


def test_full_catalog_log_tail_backward_kernel_is_bitwise_reproducible():
    user, item, ranked, (indptr, indices) = _full_catalog_case()
    ip, ix = with_ids(indptr, indices, ranked, item.shape[0])
    lt = full_catalog_cpu.log_tail(user, item, ip, ix, float("inf"))
    grad = torch.rand(user.shape[0], generator=torch.Generator().manual_seed(1))
    two, one = _repeat(
        lambda: full_catalog_cpu.log_tail_backward(grad, lt, user, item, ip, ix, float("inf"))
    )
    assert len(set(two)) == 1 and one == two[0]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize(
    "loss",
    [kdfast.full_catalog_listwise_loss, kdfast.full_catalog_set_loss],
    ids=["listwise", "set"],
)
def test_full_catalog_gradients_are_bitwise_reproducible(loss, backend):
    # the whole loss (the gathered scores included): the same bits run to run on 2 threads; cpp
    # also the same bits on 1 thread, while the torch backend's GEMMs (the BLAS library) split
    # their sums by thread count, so it promises the same bits for one thread count only
    user, item, ranked, exclude = _full_catalog_case()

    def grads():
        u, v = user.clone().requires_grad_(), item.clone().requires_grad_()
        loss(u, v, ranked, exclude=exclude, backend=backend).backward()
        return u.grad, v.grad

    two, one = _repeat(grads)
    assert len(set(two)) == 1
    if backend == "cpp":
        assert one == two[0]


def test_bpr_loss_gradients_are_bitwise_reproducible():
    # the trainer's base loss gathers rows of the student tables by id; its gradient must sum each
    # row in a fixed order (row gathers by advanced indexing add with atomics on several threads)
    from kdfast.train import bpr_loss

    g = torch.Generator().manual_seed(3)
    user, item = torch.randn(50, 64, generator=g), torch.randn(200, 64, generator=g)
    users, pos, neg = (torch.randint(0, n, (20000,), generator=g) for n in (50, 200, 200))

    def grads():
        u, v = user.clone().requires_grad_(), item.clone().requires_grad_()
        bpr_loss(u, v, users, pos, neg).backward()
        return u.grad, v.grad

    two, one = _repeat(grads)
    assert len(set(two)) == 1


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_method_gradients_are_bitwise_reproducible(name, monkeypatch):
    # every KD method's loss on a batch large enough for both threads to work, its gradients
    # to the student tables (and the method's own parameters) run after run on 2 threads
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    from tests.methods._helpers import teacher_setup
    from tests.methods.test_contract import SMALL

    n_users, n_items, dim = 40, 150, 64
    tu, ti, train, _ = teacher_setup(n_users=n_users, n_items=n_items)
    cls, _ = registry.method_class(name)
    opts = registry.validate_options(name, SMALL.get(name, {}))
    g = torch.Generator().manual_seed(5)
    student = (torch.randn(n_users, dim, generator=g) * 0.3, torch.randn(n_items, dim, generator=g))
    batch = tuple(torch.randint(0, n, (8192,), generator=g) for n in (n_users, n_items, n_items))

    def grads():
        torch.manual_seed(0)
        m = cls.build(tu, ti, train, dim, generator=torch.Generator().manual_seed(7), **opts)
        su, si = (t.clone().requires_grad_() for t in student)
        m.start_epoch(0, 2, su.detach(), si.detach())
        m(su, si, *batch).backward()
        own = [p.grad for p in m.parameters() if p.grad is not None]
        return (su.grad, si.grad, *own)

    with _threads(2):
        runs = [_bits(*grads()) for _ in range(4)]
    assert len(set(runs)) == 1
