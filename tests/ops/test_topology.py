"""kdfast.topology_loss (FTD) and kdfast.grouped_topology_loss (HTD entity level) against the direct
N x N formulas (autograd of kdfast.ops.topology.reference), on every backend."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.ops.topology import reference as R
from tests.conftest import DEVICE, backend_params

ALL = backend_params("torch", "cpp", "triton")


def _dev(backend):
    return "cpu" if backend == "cpp" else DEVICE


def _tol(dtype, backend):
    if dtype == torch.float64 and backend != "triton":
        return dict(rtol=1e-9, atol=1e-9)
    return dict(rtol=2e-4, atol=2e-4)


def _inputs(n, dt, ds, dtype, device, seed, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, dt, generator=g, dtype=dtype)
    s = torch.randn(n, ds, generator=g, dtype=dtype)
    for r in zero_rows:
        t[r] = 0
        s[(r + 1) % n] = 0
    return t.to(device), s.to(device)


def _ref_ftd(t, s, g_out):
    tr, sr = t.clone().requires_grad_(), s.clone().requires_grad_()
    loss = R.topology_loss(tr, sr)
    (loss * g_out).backward()
    return loss.detach(), tr.grad, sr.grad


def _ref_grouped(t, s, groups, filt, g_out):
    sr = s.clone().requires_grad_()
    loss, count = R.grouped_topology_loss(t, sr, groups, filt)
    (loss * g_out).backward()
    return loss.detach(), count, sr.grad


# ------------------------------------------------------------------ FTD
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# 600: several splits
@pytest.mark.parametrize("n,dt,ds", [(1, 3, 2), (13, 7, 3), (70, 33, 5), (600, 9, 4)])
def test_ftd_matches_direct_formula(backend, dtype, n, dt, ds):
    dev = _dev(backend)
    t, s = _inputs(n, dt, ds, dtype, dev, seed=n + dt, zero_rows=(0,) if n > 3 else ())
    g_out = 0.37
    want, want_gt, want_gs = _ref_ftd(t, s, g_out)
    tt, ss = t.clone().requires_grad_(), s.clone().requires_grad_()
    got = kdfast.topology_loss(tt, ss, backend=backend)
    (got * g_out).backward()
    tol = _tol(dtype, backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(tt.grad, want_gt, **tol)
    torch.testing.assert_close(ss.grad, want_gs, **tol)
    assert torch.isfinite(ss.grad).all() and torch.isfinite(tt.grad).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("teacher_grad", [True, False])
@pytest.mark.parametrize("n,dt,ds", [(40, 70, 5), (40, 60, 10), (33, 130, 20)])
def test_ftd_several_column_tiles(backend, teacher_grad, n, dt, ds):
    """dt + ds beyond one 64-column tile of the Triton kernels: the Gram's mirrored tiles, the
    student columns in one tile of their own (70, 5), straddling two (60, 10), and three tiles (130,
    20); with a
    frozen teacher only the student's column tiles are computed."""
    dev = _dev(backend)
    t, s = _inputs(n, dt, ds, torch.float32, dev, seed=n + dt, zero_rows=(2,))
    want, want_gt, want_gs = _ref_ftd(t, s, 0.37)
    tt, ss = t.clone().requires_grad_(teacher_grad), s.clone().requires_grad_()
    got = kdfast.topology_loss(tt, ss, backend=backend)
    (got * 0.37).backward()
    tol = _tol(torch.float32, backend)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(ss.grad, want_gs, **tol)
    if teacher_grad:
        torch.testing.assert_close(tt.grad, want_gt, **tol)
    else:
        assert tt.grad is None


@pytest.mark.parametrize("backend", ALL)
def test_ftd_zero_rows_have_zero_gradient_and_zero_cosine(backend):
    dev = _dev(backend)
    t, s = _inputs(9, 5, 4, torch.float32, dev, seed=3)
    s[2] = 0
    ss = s.clone().requires_grad_()
    loss = kdfast.topology_loss(t, ss, backend=backend)
    loss.backward()
    assert torch.all(ss.grad[2] == 0)
    # a zero student row: cos = 0 with everything, so its pairs contribute cos(t_2, t_b)^2
    # (diagonal too)
    a = R.normalize_rows(t)
    b = R.normalize_rows(s)
    direct = ((a @ a.T - b @ b.T) ** 2).sum()
    torch.testing.assert_close(loss, direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ALL)
def test_ftd_teacher_without_grad_and_mean(backend):
    dev = _dev(backend)
    t, s = _inputs(11, 6, 3, torch.float32, dev, seed=4)
    ss = s.clone().requires_grad_()
    loss = kdfast.topology_loss(t, ss, reduction="mean", backend=backend)
    loss.backward()
    assert t.grad is None
    torch.testing.assert_close(loss, R.topology_loss(t, s) / 121, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert kdfast.topology_loss(t, ss, backend=backend).requires_grad is False


def test_ftd_gram_rewrite_identity():
    t, s = _inputs(40, 9, 4, torch.float64, "cpu", seed=5)
    a, b = R.normalize_rows(t), R.normalize_rows(s)
    rhs = (a.T @ a).pow(2).sum() + (b.T @ b).pow(2).sum() - 2 * (a.T @ b).pow(2).sum()
    torch.testing.assert_close(R.topology_loss(t, s), rhs)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40), dt=st.integers(1, 12), ds=st.integers(1, 6), seed=st.integers(0, 10**6)
)
def test_ftd_property_cpp_vs_reference(n, dt, ds, seed):
    backend = "cpp" if kdfast.backends()["cpp"][0] else "torch"
    t, s = _inputs(n, dt, ds, torch.float64, "cpu", seed)
    ss = s.clone().requires_grad_()
    got = kdfast.topology_loss(t, ss, backend=backend)
    got.backward()
    want, _, want_gs = _ref_ftd(t, s, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ss.grad, want_gs, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ grouped (HTD entity level)
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("filt", [True, False])
# 150: several row tiles per group; (40, 60, 10): the student columns straddle two 64-column tiles
@pytest.mark.parametrize(
    "n,dt,ds,k", [(1, 3, 2, 1), (23, 7, 3, 4), (75, 65, 5, 3), (150, 9, 3, 1), (40, 60, 10, 2)]
)
def test_grouped_matches_direct_formula(backend, dtype, filt, n, dt, ds, k):
    dev = _dev(backend)
    t, s = _inputs(n, dt, ds, dtype, dev, seed=n * k, zero_rows=(1,) if n > 3 else ())
    groups = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(n)).to(dev)
    g_out = -1.7
    want, count, want_gs = _ref_grouped(t, s, groups, filt, g_out)
    ss = s.clone().requires_grad_()
    got = kdfast.grouped_topology_loss(
        t, ss, groups, k + 1, teacher_cos_filter=filt, backend=backend
    )
    (got * g_out).backward()
    tol = _tol(dtype, backend)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(ss.grad, want_gs, **tol)
    got_mean = kdfast.grouped_topology_loss(
        t, s, groups, k + 1, teacher_cos_filter=filt, reduction="mean", backend=backend
    )
    torch.testing.assert_close(got_mean, want / count.clamp(min=1), **tol)


def test_grouped_pair_convention_and_filter():
    # two rows in one group: ordered pairs (0,1) and (1,0) both count, the diagonal adds 0
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0])
    c01 = 2**-0.5
    # filter: the pairs with row 2 have teacher cosine <= 0 and are dropped
    want = 2 * (0.0 - c01) ** 2
    for backend in [b.values[0] for b in ALL if not b.marks]:
        dev = _dev(backend)
        got = kdfast.grouped_topology_loss(t.to(dev), s.to(dev), groups.to(dev), 1, backend=backend)
        torch.testing.assert_close(
            got.cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6
        )
        off = kdfast.grouped_topology_loss(
            t.to(dev), s.to(dev), groups.to(dev), 1, teacher_cos_filter=False, backend=backend
        )
        # + pairs (0,2),(2,0): (1 - (-1))^2 each, (1,2),(2,1): (0 - (-c01))^2 each
        torch.testing.assert_close(
            off.cpu(),
            torch.tensor(want + 2 * 4 + 2 * 0.5, dtype=torch.float64),
            rtol=1e-6,
            atol=1e-6,
        )


@pytest.mark.parametrize("backend", ALL)
def test_grouped_teacher_gets_no_gradient(backend):
    dev = _dev(backend)
    t, s = _inputs(10, 4, 3, torch.float32, dev, seed=8)
    tt, ss = t.clone().requires_grad_(), s.clone().requires_grad_()
    groups = torch.tensor([0, 1] * 5, device=dev)
    kdfast.grouped_topology_loss(tt, ss, groups, 2, backend=backend).backward()
    assert tt.grad is None and ss.grad is not None


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
@pytest.mark.parametrize("filt", [False])  # (with the filter: tests/ops/test_contract.py)
def test_grouped_gradcheck(backend, filt):
    t, s = _inputs(8, 4, 3, torch.float64, "cpu", seed=9)
    s.requires_grad_()
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    assert torch.autograd.gradcheck(
        lambda b: kdfast.grouped_topology_loss(
            t, b, groups, 3, teacher_cos_filter=filt, backend=backend
        ),
        (s,),
    )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 80),
    k=st.integers(1, 6),
    dt=st.integers(1, 9),
    ds=st.integers(1, 5),
    filt=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_grouped_property_cpp_vs_reference(n, k, dt, ds, filt, seed):
    backend = "cpp" if kdfast.backends()["cpp"][0] else "torch"
    t, s = _inputs(n, dt, ds, torch.float64, "cpu", seed)
    groups = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))
    ss = s.clone().requires_grad_()
    got = kdfast.grouped_topology_loss(t, ss, groups, k, teacher_cos_filter=filt, backend=backend)
    got.backward()
    want, _, want_gs = _ref_grouped(t, s, groups, filt, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ss.grad, want_gs, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ compile, bad input
def test_empty_input():
    t, s = torch.zeros(0, 4), torch.zeros(0, 2, requires_grad=True)
    for backend in ("torch", "cpp") if kdfast.backends()["cpp"][0] else ("torch",):
        loss = kdfast.topology_loss(t, s, backend=backend)
        assert float(loss) == 0.0
        loss2 = kdfast.grouped_topology_loss(
            t, s, torch.zeros(0, dtype=torch.int64), 2, backend=backend
        )
        assert float(loss2) == 0.0
