"""Every backend agrees with the reference, on random shapes, dtypes, exclusions and non-finite
values (hypothesis). The non-finite cases follow the documented rules: top-K ranks a score that is
not finite as -inf; a Plackett-Luce row with a NaN is NaN, with a +inf unranked score or log_tail
+inf; a topology row's scale does not matter."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdfast
from tests.conftest import backend_params, device_of

BACKENDS = backend_params("cpp", "triton")
NAN, INF = float("nan"), float("inf")


def _examples(backend):
    # the Triton interpreter runs a kernel in Python: fewer examples there
    return settings(
        max_examples=6 if backend == "triton" else 30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
    )


def _same_non_finite(got, want):
    """Equal NaN and +-inf patterns, and close finite values."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def _poison(x, gen, p, values):
    """x with a share p of its entries set to values drawn from `values`."""
    hit = torch.rand(x.shape, generator=gen) < p
    pick = torch.randint(0, len(values), x.shape, generator=gen)
    bad = torch.tensor(values, dtype=x.dtype)[pick]
    return torch.where(hit, bad, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_agrees(backend):
    @_examples(backend)
    @given(
        n_q=st.integers(1, 6), n_k=st.integers(1, 40), d=st.integers(1, 6), k=st.integers(1, 45),
        f64=st.booleans(), poison=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 2**31 - 1),
    )  # fmt: skip
    def check(n_q, n_k, d, k, f64, poison, seed):
        if backend == "triton" and f64:
            f64 = False  # the triton backend ranks float64 inputs as float32: exact on integers
        gen = torch.Generator().manual_seed(seed)
        dtype = torch.float64 if f64 else torch.float32
        q = torch.randint(-3, 4, (n_q, d), generator=gen).to(dtype)
        keys = torch.randint(-3, 4, (n_k, d), generator=gen).to(dtype)  # exact scores, many ties
        keys = _poison(keys, gen, poison, [NAN, INF, -INF, 3e38, -3e38])
        counts = torch.randint(0, 4, (n_q,), generator=gen)
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
        ids = torch.randint(0, n_k, (int(indptr[-1]),), generator=gen)
        dev = device_of(backend)
        v, i = kdfast.topk_scores(
            q.to(dev), keys.to(dev), k, exclude=(indptr, ids), backend=backend
        )
        rv, ri = kdfast.topk_scores(q, keys, k, exclude=(indptr, ids), backend="torch")
        assert torch.equal(i.cpu(), ri)
        assert torch.equal(v.cpu(), rv)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plackett_luce_agrees(backend):
    @_examples(backend)
    @given(
        B=st.integers(1, 5), K=st.integers(1, 7), L=st.integers(0, 7), tail=st.booleans(),
        f64=st.booleans(), poison=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**31 - 1),
    )  # fmt: skip
    def check(B, K, L, tail, f64, poison, seed):
        gen = torch.Generator().manual_seed(seed)
        dtype = torch.float64 if f64 else torch.float32
        s = 3 * torch.randn(B, K, generator=gen, dtype=dtype)
        s = _poison(s, gen, poison, [-INF, NAN])
        u = _poison(
            3 * torch.randn(B, L, generator=gen, dtype=dtype), gen, poison, [-INF, NAN, INF]
        )
        t = _poison(torch.randn(B, generator=gen, dtype=dtype), gen, poison, [-INF, NAN, INF])
        dev = device_of(backend)
        args = (s.to(dev), u.to(dev) if L else None)
        got = kdfast.plackett_luce_loss(
            *args, log_tail=t.to(dev) if tail else None, reduction="none", backend=backend
        )
        want = kdfast.plackett_luce_loss(
            s, u if L else None, log_tail=t if tail else None, reduction="none", backend="torch"
        )
        _same_non_finite(got, want)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plackett_luce_from_embeddings_agrees(backend):
    @_examples(backend)
    @given(
        B=st.integers(1, 5), d=st.integers(1, 6), N=st.integers(1, 12), K=st.integers(1, 6),
        L=st.integers(0, 6), f64=st.booleans(), poison=st.sampled_from([0.0, 0.1]),
        seed=st.integers(0, 2**31 - 1),
    )  # fmt: skip
    def check(B, d, N, K, L, f64, poison, seed):
        gen = torch.Generator().manual_seed(seed)
        dtype = torch.float64 if f64 else torch.float32
        q = torch.randn(B, d, generator=gen, dtype=dtype)
        e = _poison(torch.randn(N, d, generator=gen, dtype=dtype), gen, poison / 3, [NAN, INF])
        ri = torch.randint(-1, N, (B, K), generator=gen)
        ui = torch.randint(-1, N, (B, L), generator=gen) if L else None
        dev = device_of(backend)
        got = kdfast.plackett_luce_loss_from_embeddings(
            q.to(dev), e.to(dev), ri.to(dev), None if ui is None else ui.to(dev), reduction="none",
            backend=backend,
        )  # fmt: skip
        want = kdfast.plackett_luce_loss_from_embeddings(
            q, e, ri, ui, reduction="none", backend="torch"
        )
        _same_non_finite(got, want)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_catalog_agrees(backend):
    @_examples(backend)
    @given(
        B=st.integers(1, 4), I=st.integers(1, 30), d=st.integers(1, 5), K=st.integers(1, 4),
        clamp=st.sampled_from([None, 1.0]), seed=st.integers(0, 2**31 - 1),
    )  # fmt: skip
    def check(B, I, d, K, clamp, seed):
        gen = torch.Generator().manual_seed(seed)
        u, v = torch.randn(B, d, generator=gen), torch.randn(I, d, generator=gen)
        ranked = torch.randint(-1, I, (B, K), generator=gen)
        counts = torch.randint(0, 3, (B,), generator=gen)
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
        excl = (indptr, torch.randint(0, I, (int(indptr[-1]),), generator=gen))
        dev = device_of(backend)
        got = kdfast.full_catalog_listwise_loss(
            u.to(dev), v.to(dev), ranked.to(dev), exclude=excl, clamp=clamp, reduction="none",
            backend=backend,
        )  # fmt: skip
        want = kdfast.full_catalog_listwise_loss(
            u, v, ranked, exclude=excl, clamp=clamp, reduction="none", backend="torch"
        )
        _same_non_finite(got, want)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_topology_agrees(backend):
    @_examples(backend)
    @given(
        n=st.integers(1, 12), dt=st.integers(1, 6), ds=st.integers(1, 4), k=st.integers(1, 3),
        filt=st.booleans(), seed=st.integers(0, 2**31 - 1),
    )  # fmt: skip
    def check(n, dt, ds, k, filt, seed):
        gen = torch.Generator().manual_seed(seed)
        t, s = torch.randn(n, dt, generator=gen), torch.randn(n, ds, generator=gen)
        scale = 10.0 ** torch.randint(-20, 21, (n, 1), generator=gen).float()
        zero = torch.rand(n, 1, generator=gen) < 0.1  # rows of norm 0 too
        t, s = torch.where(zero, 0.0, t * scale), s * scale
        groups = torch.randint(0, k, (n,), generator=gen)
        dev = device_of(backend)
        got = kdfast.topology_loss(t.to(dev), s.to(dev), backend=backend)
        want = kdfast.topology_loss(t.double(), s.double(), backend="torch")
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-3)
        got = kdfast.grouped_topology_loss(
            t.to(dev), s.to(dev), groups.to(dev), k, teacher_cos_filter=filt, backend=backend
        )
        want = kdfast.grouped_topology_loss(
            t.double(), s.double(), groups, k, teacher_cos_filter=filt, backend="torch"
        )
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-3)

    check()
