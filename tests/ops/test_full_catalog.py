"""kdfast.full_catalog_listwise_loss / full_catalog_set_loss against a dense oracle and across
backends."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.ops.full_catalog import full_catalog_log_tail
from kdfast.ops.plackett_luce.reference import plackett_luce_loss as pl_reference
from tests.conftest import backend_params


def _dense_mask(B, I, exclude, *idx):
    mask = torch.zeros(B, I, dtype=torch.bool)
    indptr, indices = exclude
    for b in range(B):
        mask[b, indices[indptr[b] : indptr[b + 1]]] = True
        for t in idx:
            if t is not None:
                row = t[b][t[b] >= 0]
                mask[b, row] = True
    return mask


def dense_listwise(u, v, ranked, exclude, clamp=None):
    """Oracle: the full B x I score matrix, a dense mask and the plain per-row formula
    (autograd)."""
    S = u @ v.T
    if clamp is not None:
        S = S.clamp(-clamp, clamp)
    mask = _dense_mask(u.shape[0], v.shape[0], exclude, ranked)
    lt = torch.logsumexp(S.masked_fill(mask, -math.inf), 1)
    rows = []
    for b in range(u.shape[0]):
        s = S[b, ranked[b][ranked[b] >= 0]]
        tot = S.new_zeros(())
        for k in range(s.numel()):
            tot = tot - (s[k] - torch.logaddexp(torch.logsumexp(s[k:], 0), lt[b]))
        rows.append(tot)
    return torch.stack(rows)


def dense_set(u, v, pos, exclude, skip=None, clamp=None):
    S = u @ v.T
    if clamp is not None:
        S = S.clamp(-clamp, clamp)
    mask = _dense_mask(u.shape[0], v.shape[0], exclude, pos, skip)
    lt = torch.logsumexp(S.masked_fill(mask, -math.inf), 1)
    rows = []
    for b in range(u.shape[0]):
        s = S[b, pos[b][pos[b] >= 0]]
        rows.append((torch.logaddexp(s, lt[b]) - s).sum())
    return torch.stack(rows)


def make(B, I, d, K, dtype=torch.float64, seed=0, scale=1.0, n_ex=4):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, d, generator=g, dtype=dtype) * scale
    v = torch.randn(I, d, generator=g, dtype=dtype) * scale
    ranked = torch.randint(0, I, (B, K), generator=g)
    if K > 2:
        ranked[0, 1] = -1  # padding in the middle
        ranked[-1, -1] = ranked[-1, 0]  # a repeated ranked id
    if B > 2:
        ranked[1] = -1  # a row with nothing valid
    counts = torch.randint(0, 2 * n_ex + 1, (B,), generator=g)
    indptr = torch.zeros(B + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = torch.randint(0, I, (int(indptr[-1]),), generator=g)  # unsorted, with repeats
    if indices.numel() > 1:
        indices[1] = indices[0]
    return u, v, ranked, (indptr, indices)


def grads(fn, u, v, *args, go_seed=3, **kw):
    u = u.detach().clone().requires_grad_(True)
    v = v.detach().clone().requires_grad_(True)
    out = fn(u, v, *args, **kw)
    go = (
        torch.rand(out.shape, generator=torch.Generator().manual_seed(go_seed), dtype=out.dtype)
        + 0.5
    )
    gu, gv = torch.autograd.grad(out, (u, v), go)
    return out.detach(), gu, gv


@pytest.mark.parametrize("clamp", [None, 1.5])
def test_reference_listwise_matches_dense(clamp):
    u, v, ranked, ex = make(5, 41, 6, 5, scale=1.0 if clamp is None else 1.5)
    got = grads(
        kdfast.full_catalog_listwise_loss,
        u,
        v,
        ranked,
        exclude=ex,
        clamp=clamp,
        reduction="none",
        backend="torch",
    )
    want = grads(dense_listwise, u, v, ranked, ex, clamp=clamp)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[0][1] == 0 and bool((got[1][1] == 0).all())  # the all-padding row


@pytest.mark.parametrize("clamp", [None, 1.0])
def test_reference_set_matches_dense(clamp):
    u, v, pos, ex = make(4, 37, 5, 4, seed=1, scale=1.3)
    skip = torch.randint(-1, 37, (4, 3), generator=torch.Generator().manual_seed(5))
    got = grads(
        kdfast.full_catalog_set_loss,
        u,
        v,
        pos,
        exclude=ex,
        tail_skip_idx=skip,
        clamp=clamp,
        reduction="none",
        backend="torch",
    )
    want = grads(dense_set, u, v, pos, ex, skip, clamp=clamp)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reference_chunking_is_invisible():
    from kdfast._core.csr import with_ids as _merged_exclusions
    from kdfast.ops.full_catalog.reference import log_tail, log_tail_backward

    u, v, ranked, ex = make(6, 53, 4, 3, seed=2)
    ip, ix = _merged_exclusions(ex[0], ex[1], ranked, 53)
    a = log_tail(u, v, ip, ix, math.inf)
    b = log_tail(u, v, ip, ix, math.inf, max_tile=13)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g = torch.rand(6, dtype=torch.float64)
    for x, y in zip(
        log_tail_backward(g, a, u, v, ip, ix, math.inf),
        log_tail_backward(g, a, u, v, ip, ix, math.inf, max_tile=13),
    ):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_everything_excluded_gives_finite_loss():
    u, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ranked = torch.tensor([[0, 1], [2, -1]])
    ex = (
        torch.tensor([0, 2, 4]),
        torch.tensor(
            [
                2,
                3,
                0,
                1,
            ]
        ),
    )
    lt = full_catalog_log_tail(u, v, ranked, exclude=ex, backend="torch")
    assert bool(torch.isinf(lt[0])) and lt[0] < 0
    out, gu, gv = grads(
        kdfast.full_catalog_listwise_loss,
        u,
        v,
        ranked,
        exclude=ex,
        reduction="none",
        backend="torch",
    )
    want = grads(dense_listwise, u, v, ranked, ex)
    for a, b in zip((out, gu, gv), want):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
@pytest.mark.parametrize(
    "dtype,clamp", [(torch.float32, None), (torch.float32, 2.0), (torch.float64, None)]
)
def test_backend_matches_reference(backend, dtype, clamp, device_for):
    u, v, ranked, ex = make(4, 67, 10, 5, dtype=dtype, seed=7, scale=1.0 if clamp is None else 1.4)
    dev = device_for(backend)
    u, v, ranked = u.to(dev), v.to(dev), ranked.to(dev)
    ex = (ex[0].to(dev), ex[1].to(dev))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for fn in (kdfast.full_catalog_listwise_loss, kdfast.full_catalog_set_loss):
        ref = grads(fn, u, v, ranked, exclude=ex, clamp=clamp, reduction="none", backend="torch")
        got = grads(fn, u, v, ranked, exclude=ex, clamp=clamp, reduction="none", backend=backend)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
def test_dense_exclusions_and_one_row(backend, device_for):
    # one row, most of the catalog excluded (many exclusions per tile), odd sizes
    g = torch.Generator().manual_seed(11)
    dev = device_for(backend)
    u, v = torch.randn(1, 5, generator=g).to(dev), torch.randn(53, 5, generator=g).to(dev)
    ranked = torch.tensor([[3, 9]], device=dev)
    ex = (torch.tensor([0, 60], device=dev), torch.randint(0, 53, (60,), generator=g).to(dev))
    ref = grads(kdfast.full_catalog_listwise_loss, u, v, ranked, exclude=ex, backend="torch")
    got = grads(kdfast.full_catalog_listwise_loss, u, v, ranked, exclude=ex, backend=backend)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 4),
    I=st.integers(1, 30),
    d=st.integers(1, 5),
    K=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    clamp=st.sampled_from([None, 0.5, 3.0]),
)
def test_property_reference_vs_dense(B, I, d, K, seed, clamp):
    u, v, ranked, ex = make(B, I, d, K, seed=seed, n_ex=2)
    got = kdfast.full_catalog_listwise_loss(
        u, v, ranked, exclude=ex, clamp=clamp, reduction="none", backend="torch"
    )
    want = dense_listwise(u, v, ranked, ex, clamp=clamp)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_reductions_and_pl_consistency():
    u, v, ranked, ex = make(3, 20, 4, 4, seed=9)
    per = kdfast.full_catalog_listwise_loss(
        u, v, ranked, exclude=ex, reduction="none", backend="torch"
    )
    assert torch.allclose(
        kdfast.full_catalog_listwise_loss(u, v, ranked, exclude=ex, backend="torch"), per.sum()
    )
    assert torch.allclose(
        kdfast.full_catalog_listwise_loss(
            u, v, ranked, exclude=ex, reduction="mean", backend="torch"
        ),
        per.mean(),
    )
    # without exclusions and with every item ranked, the tail is empty: plain Plackett-Luce
    all_items = torch.arange(20).repeat(3, 1)
    full = kdfast.full_catalog_listwise_loss(u, v, all_items, reduction="none", backend="torch")
    torch.testing.assert_close(full, pl_reference(u @ v.T, None, None, "none"))


def test_set_loss_checks_tail_skip_idx():
    """The set loss's own argument (the listwise loss's bad inputs: tests/ops/contract.py)."""
    u, v, ranked, ex = make(3, 20, 4, 4)
    with pytest.raises(ValueError, match="tail_skip_idx"):
        kdfast.full_catalog_set_loss(u, v, ranked, exclude=ex, tail_skip_idx=ranked[:1])
    with pytest.raises(TypeError, match="tail_skip_idx"):
        kdfast.full_catalog_set_loss(u, v, ranked, exclude=ex, tail_skip_idx=ranked.float())


@pytest.mark.parametrize("backend", backend_params("cpp"))
@pytest.mark.parametrize(
    "B,I,d", [(37, 300, 7), (5, 129, 4), (70, 257, 20), (1, 1, 1), (34, 128, 3)]
)
@pytest.mark.parametrize("clamp", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_tiles_and_blocks_match_reference(backend, B, I, d, clamp, dtype):
    """The C++ kernel's blocking: row blocks of 32 (and register blocks of 4 and 2 rows), item tiles
    of 128 with a partial last tile, columns in fours with a remainder; against the reference, and
    the same bits on 1 thread (the backward's single pass) and 2 (its two passes)."""
    u, v, ranked, ex = make(B, I, d, 3, dtype=dtype, seed=B + I, scale=1.3)
    ranked = ranked.clamp(max=I - 1)
    for fn in (kdfast.full_catalog_listwise_loss, kdfast.full_catalog_set_loss):
        ref = grads(fn, u, v, ranked, exclude=ex, clamp=clamp, reduction="none", backend="torch")
        threads = torch.get_num_threads()
        try:
            runs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                runs.append(
                    grads(fn, u, v, ranked, exclude=ex, clamp=clamp, reduction="none",
                          backend=backend)
                )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        tol = 2e-5 if dtype == torch.float32 else 1e-10
        for a, b in zip(runs[0], ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for a, b in zip(*runs):
            assert torch.equal(a, b)
