"""kdfast.topk_scores: every backend against the reference, exclusions, edge cases, bad input."""

import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.ops.topk.reference import topk_scores as reference_topk
from tests.conftest import backend_params

BACKENDS = backend_params("torch", "cpp", "triton")
TINY = 64 * 64  # n_q * n_k at most, for the Triton interpreter


def empty_csr(n_q):
    return torch.zeros(n_q + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


def ref(q, keys, k, exclude=None):
    """The reference on canonical CSR input, called directly (the oracle)."""
    ip, ix = (
        kdfast.as_csr(exclude, "exclude", q.shape[0], keys.shape[0])
        if exclude is not None
        else empty_csr(q.shape[0])
    )
    return reference_topk(q, keys, k, ip, ix)


def int_embeddings(n, d, dtype, gen, lo=-3, hi=4):
    """Small-integer embeddings: every dot product is exact, so ties are frequent and exact."""
    return torch.randint(lo, hi, (n, d), generator=gen).to(dtype)


def rand_csr(n_q, n_k, gen, max_per_row=6, repeats=True):
    """Unsorted, possibly repeated exclusion ids."""
    counts = torch.randint(0, max_per_row + 1, (n_q,), generator=gen)
    indptr = torch.zeros(n_q + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = torch.randint(0, max(n_k, 1), (int(indptr[-1]),), generator=gen)
    if repeats and indices.numel() > 1:
        indices[1::3] = indices[0::3][: indices[1::3].numel()]
    return indptr, indices


def check_tie_aware(q, keys, k, exclude, values, index, tol):
    """Values match exact float64 scores; the index set is right up to near-ties at the k-th
    score."""
    n_q, n_k = q.shape[0], keys.shape[0]
    s = q.double() @ keys.double().T
    ip, ix = kdfast.as_csr(exclude, "exclude", n_q, n_k) if exclude is not None else empty_csr(n_q)
    excluded = torch.zeros(n_q, n_k, dtype=torch.bool)
    excluded[kdfast.csr.row_ids(ip), ix] = True
    rv, _ = ref(q, keys, k, exclude)
    assert values.shape == (n_q, k) and index.shape == (n_q, k)
    assert values.dtype == torch.float32 and index.dtype == torch.int64
    for r in range(n_q):
        n_valid = min(k, int((~excluded[r]).sum()))
        got = index[r, :n_valid]
        assert (got >= 0).all() and (index[r, n_valid:] == -1).all()
        assert torch.isinf(values[r, n_valid:]).all() and (values[r, n_valid:] < 0).all()
        assert got.unique().numel() == n_valid
        assert not excluded[r, got].any()
        torch.testing.assert_close(values[r, :n_valid].double(), s[r, got], atol=tol, rtol=tol)
        torch.testing.assert_close(values[r], rv[r], atol=tol, rtol=tol)
        assert (values[r, :n_valid][1:] <= values[r, :n_valid][:-1] + tol).all()
        if n_valid:
            kth = float(rv[r, n_valid - 1])
            must = ((s[r] > kth + tol) & ~excluded[r]).nonzero().flatten()
            assert set(must.tolist()) <= set(got.tolist())
            assert (s[r, got] >= kth - tol).all()


SHAPES = [  # n_q, n_k, d, k
    (1, 1, 1, 1),
    (7, 13, 3, 5),
    (5, 37, 4, 50),  # k > n_k
    (9, 61, 7, 8),
    (33, 1031, 7, 10),  # n_k prime, above one key chunk of a small d
    (3, 4099, 16, 100),
    (50, 257, 130, 17),  # d > one register block, odd
]


def _tiny_only(backend, n_q, n_k):
    if backend == "triton" and n_q * n_k > TINY:
        pytest.skip("Triton interpreter: tiny shapes only")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_integer_scores_exact_order(backend, dtype, shape):
    n_q, n_k, d, k = shape
    _tiny_only(backend, n_q, n_k)
    gen = torch.Generator().manual_seed(n_q * 7919 + n_k)
    q, keys = int_embeddings(n_q, d, dtype, gen), int_embeddings(n_k, d, dtype, gen)
    excl = rand_csr(n_q, n_k, gen)
    q0, k0 = q.clone(), keys.clone()
    v, i = kdfast.topk_scores(q, keys, k, exclude=excl, backend=backend)
    rv, ri = ref(q, keys, k, excl)
    assert torch.equal(i, ri)
    assert torch.equal(v, rv)
    assert torch.equal(q, q0) and torch.equal(keys, k0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [(6, 50, 8, 5), (40, 3001, 64, 100), (17, 999, 33, 1000)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_random_floats_tie_aware(backend, shape):
    n_q, n_k, d, k = shape
    _tiny_only(backend, n_q, n_k)
    gen = torch.Generator().manual_seed(1)
    q, keys = torch.randn(n_q, d, generator=gen), torch.randn(n_k, d, generator=gen)
    excl = rand_csr(n_q, n_k, gen)
    v, i = kdfast.topk_scores(q, keys, k, exclude=excl, backend=backend)
    check_tie_aware(q, keys, k, excl, v, i, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusion_forms_agree(backend):
    gen = torch.Generator().manual_seed(2)
    n_q, n_k, d, k = 6, 40, 4, 12
    q, keys = int_embeddings(n_q, d, torch.float32, gen), int_embeddings(n_k, d, torch.float32, gen)
    indptr, indices = rand_csr(n_q, n_k, gen, max_per_row=10)
    dense = torch.zeros(n_q, n_k)
    dense[kdfast.csr.row_ids(indptr), indices] = 1
    forms = {
        "pair": (indptr, indices),
        "numpy pair": (indptr.numpy(), indices.numpy()),
        "int32 pair": (indptr.int(), indices.int()),
        "torch sparse csr": dense.to_sparse_csr(),
        "scipy csr": scipy.sparse.csr_matrix(dense.numpy()),
        "scipy coo": scipy.sparse.coo_matrix(dense.numpy()),
    }
    if backend == "triton":  # the conversion is backend-independent; spare the interpreter
        forms = {name: forms[name] for name in ("pair", "scipy csr")}
    expected = ref(q, keys, k, (indptr, indices))
    for name, excl in forms.items():
        v, i = kdfast.topk_scores(q, keys, k, exclude=excl, backend=backend)
        assert torch.equal(i, expected[1]), name
        assert torch.equal(v, expected[0]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_with_every_key_excluded(backend):
    gen = torch.Generator().manual_seed(3)
    q, keys = torch.randn(3, 4, generator=gen), torch.randn(9, 4, generator=gen)
    indptr = torch.tensor([0, 0, 18, 20])
    indices = torch.cat([torch.arange(9).flip(0), torch.arange(9), torch.tensor([4, 4])])
    v, i = kdfast.topk_scores(q, keys, 5, exclude=(indptr, indices), backend=backend)
    assert (i[1] == -1).all() and torch.isneginf(v[1]).all()
    assert (i[0] >= 0).all() and (i[2] >= 0).all() and 4 not in i[2].tolist()
    rv, ri = ref(q, keys, 5, (indptr, indices))
    assert torch.equal(i, ri)
    torch.testing.assert_close(v, rv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_keys_and_signed_zero(backend):
    """NaN scores rank as -inf (reported -inf), below every finite score, ties by index; -0 ==
    +0."""
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    keys = torch.tensor(
        [
            [float("nan"), 1.0],
            [-0.0, 5.0],
            [0.0, 2.0],
            [float("-inf"), 0.0],
            [-2.0, 0.0],
            [float("nan"), 0.0],
            [0.0, 1.0],
        ]
    )
    v, i = kdfast.topk_scores(q, keys, 7, backend=backend)
    rv, ri = ref(q, keys, 7)
    assert torch.equal(i, ri)
    assert torch.equal(v, rv)
    assert i[0].tolist() == [
        1,
        2,
        6,
        4,
        0,
        3,
        5,
    ]  # row 0: 0,0,0 (-0 == 0), -2, then -inf/NaN by index
    assert not torch.isnan(v).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_queries_and_single_row(backend):
    keys = torch.randn(10, 3)
    v, i = kdfast.topk_scores(torch.zeros(0, 3), keys, 4, backend=backend)
    assert (
        v.shape == (0, 4)
        and i.shape == (0, 4)
        and v.dtype == torch.float32
        and i.dtype == torch.int64
    )
    q = torch.randn(1, 3)
    v, i = kdfast.topk_scores(q, keys, 4, backend=backend)
    assert torch.equal(i, torch.topk(q @ keys.T, 4).indices)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_isa_variants_and_threads(isa, dtype):
    """Every compiled instruction-set variant gives the reference order; threads never change
    bits."""
    ext = kdfast._core.backend.ext()
    if ext is None:
        pytest.skip("C++ extension not built")
    try:
        ext.topk_isa(isa)
    except ValueError:
        pytest.skip(f"CPU lacks {isa}")
    from kdfast.ops.topk.cpu import topk_scores as cpp_topk

    gen = torch.Generator().manual_seed(4)
    q, keys = int_embeddings(29, 19, dtype, gen), int_embeddings(2003, 19, dtype, gen)
    indptr, indices = rand_csr(29, 2003, gen, max_per_row=40)
    rv, ri = reference_topk(q, keys, 30, indptr, indices)
    v, i = cpp_topk(q, keys, 30, indptr, indices, isa=isa)
    assert torch.equal(i, ri) and torch.equal(v, rv)
    qf, kf = (
        torch.randn(29, 19, dtype=dtype, generator=gen),
        torch.randn(2003, 19, dtype=dtype, generator=gen),
    )
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp_topk(qf, kf, 30, indptr, indices, isa=isa)
        torch.set_num_threads(3)
        three = cpp_topk(qf, kf, 30, indptr, indices, isa=isa)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    check_tie_aware(qf, kf, 30, (indptr, indices), *one, tol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    n_q=st.integers(1, 12),
    n_k=st.integers(1, 80),
    d=st.integers(1, 9),
    k=st.integers(1, 90),
    seed=st.integers(0, 2**31 - 1),
    float64=st.booleans(),
    n_excl=st.integers(0, 12),
)
def test_property_cpp_equals_reference(n_q, n_k, d, k, seed, float64, n_excl):
    """With exact (integer) scores the cpp backend must reproduce the reference bit for bit."""
    if kdfast._core.backend.ext() is None:
        pytest.skip("C++ extension not built")
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if float64 else torch.float32
    q, keys = int_embeddings(n_q, d, dtype, gen, -2, 3), int_embeddings(n_k, d, dtype, gen, -2, 3)
    excl = rand_csr(n_q, n_k, gen, max_per_row=n_excl)
    v, i = kdfast.topk_scores(q, keys, k, exclude=excl, backend="cpp")
    rv, ri = ref(q, keys, k, excl)
    assert torch.equal(i, ri) and torch.equal(v, rv)


def test_too_many_keys():
    keys = torch.zeros(1, 1).expand(2**32, 1)  # 2^32 rows without the memory (stride 0)
    with pytest.raises(ValueError, match="2\\^32"):
        kdfast.topk_scores(torch.zeros(1, 1), keys, 1)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_no_keys_or_zero_dim(backend):
    v, i = kdfast.topk_scores(torch.randn(3, 4), torch.zeros(0, 4), 2, backend=backend)
    assert (i == -1).all() and torch.isneginf(v).all()
    v, i = kdfast.topk_scores(torch.zeros(2, 0), torch.zeros(5, 0), 3, backend=backend)
    # all scores 0: lowest indices win
    assert i.tolist() == [[0, 1, 2], [0, 1, 2]] and (v == 0).all()


def test_cpp_sorted_rows_with_repeats_are_used_as_given():
    """Rows already sorted (repeats allowed) skip canonicalisation; the kernel's pointer walk
    copes."""
    if kdfast._core.backend.ext() is None:
        pytest.skip("C++ extension not built")
    from kdfast._core.csr import rows_sorted as _sorted_rows
    from kdfast.ops.topk.cpu import topk_scores as cpp_topk

    indptr, indices = torch.tensor([0, 4, 4, 6]), torch.tensor([1, 1, 3, 3, 0, 0])
    assert _sorted_rows(indptr, indices)
    assert not _sorted_rows(torch.tensor([0, 2]), torch.tensor([3, 1]))
    # a new row may start lower
    assert _sorted_rows(torch.tensor([0, 2, 3]), torch.tensor([5, 6, 1]))
    gen = torch.Generator().manual_seed(5)
    q, keys = int_embeddings(3, 4, torch.float32, gen), int_embeddings(6, 4, torch.float32, gen)
    v, i = cpp_topk(q, keys, 6, indptr, indices)
    rv, ri = reference_topk(q, keys, 6, indptr, indices)
    assert torch.equal(i, ri) and torch.equal(v, rv)
