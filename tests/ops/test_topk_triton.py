"""Triton backend of kdfast.topk_scores against the reference (interpreter on CPU without a GPU).

Tiny shapes and small blocks (block_m=16, block_n=16): tl.topk runs element by element in the Triton
interpreter. Both kernel variants ("buffer", "merge") are covered.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.ops.topk.reference import topk_scores as ref_topk
from tests.conftest import DEVICE, backend_params

pytestmark = pytest.mark.parametrize("backend", backend_params("triton"))
VARIANTS = [
    ("buffer", {"block_m": 16, "block_n": 16, "compact_rows": 4}),
    ("merge", {"block_m": 16}),
]


def tri(q, kk, k, excl, variant, **kw):
    from kdfast.ops.topk.triton import topk_scores

    return topk_scores(q, kk, k, *excl, variant=variant, **kw)


def csr(rows, device=DEVICE):
    indptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    ids = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    return indptr.to(device), ids.to(device)


def no_excl(n_q):
    return csr([[] for _ in range(n_q)])


def tie_aware_equal(q, kk, excl, vals, idx, rvals, ridx, tol=1e-5):
    """Same empty slots, no excluded or repeated index, and the float64 scores of the chosen keys
    equal those of the reference's keys position by position (near-ties may swap)."""
    assert not torch.isnan(vals).any()
    assert torch.equal(idx == -1, ridx == -1)
    valid = idx >= 0
    for r in range(idx.shape[0]):
        got = idx[r][valid[r]].tolist()
        assert len(set(got)) == len(got)
        banned = set(excl[1][int(excl[0][r]) : int(excl[0][r + 1])].tolist())
        assert not banned & set(got)
    q64, k64 = q.double(), kk.double()

    def exact(ix):
        e = (q64[:, None, :] * k64[ix.clamp(min=0)]).sum(-1)
        e = torch.where(torch.isnan(e), torch.full_like(e, float("-inf")), e)
        return torch.where(ix >= 0, e, torch.full_like(e, float("-inf")))

    e_out = torch.sort(exact(idx), dim=1, descending=True).values
    e_ref = exact(ridx)
    scale = q64.norm(dim=1, keepdim=True) * k64.norm(dim=1).max()
    fin = torch.isfinite(e_ref)
    assert torch.equal(torch.isfinite(e_out), fin)
    assert ((e_out - e_ref).abs()[fin] <= tol * scale.expand_as(e_ref)[fin]).all()
    assert torch.equal(torch.isneginf(vals), torch.isneginf(rvals))


@pytest.mark.parametrize("variant,kw", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_integer_embeddings_exact_with_ties_and_exclusions(backend, variant, kw):
    g = torch.Generator().manual_seed(0)
    n_q, n_k, d, k = 5, 70, 8, 12  # n_k not a multiple of BN = 16
    q = torch.randint(-2, 3, (n_q, d), generator=g).float().to(DEVICE)
    kk = torch.randint(-2, 3, (n_k, d), generator=g).float().to(DEVICE)
    # row 1: a run crossing tile boundaries (14..35), repeats and unsorted; row 3: nothing
    excl = csr(
        [
            [3, 1, 3],
            list(range(35, 13, -1)) + [14],
            [69, 0, 15, 16, 31, 32, 47, 48, 63, 64],
            [],
            list(range(0, 70, 2)),
        ]
    )
    v, i = tri(q, kk, k, excl, variant, **kw)
    rv, ri = ref_topk(q, kk, k, *excl)
    assert torch.equal(i, ri)
    assert torch.equal(v, rv)


@pytest.mark.parametrize("variant,kw", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_random_floats_split_k_tie_aware(backend, variant, kw):
    g = torch.Generator().manual_seed(1)
    n_q, n_k, d, k = 6, 150, 12, 10  # d not a power of two
    q = torch.randn(n_q, d, generator=g).to(DEVICE)
    kk = torch.randn(n_k, d, generator=g).to(DEVICE)
    excl = csr([[0, 149], list(range(40, 90)), [], [5] * 4, list(range(150)), [77, 78, 79, 80]])
    v, i = tri(q, kk, k, excl, variant, splits=3, **kw)  # exclusions cross the split boundaries too
    rv, ri = ref_topk(q, kk, k, *excl)
    tie_aware_equal(q, kk, excl, v, i, rv, ri)
    assert (i[4] == -1).all() and torch.isneginf(v[4]).all()  # everything excluded


def test_k_larger_than_n_k_and_nan_keys(backend):
    g = torch.Generator().manual_seed(2)
    n_q, n_k, d, k = 3, 20, 8, 30
    q = torch.randn(n_q, d, generator=g).to(DEVICE)
    kk = torch.randn(n_k, d, generator=g)
    kk[[2, 7, 19]] = float("nan")
    kk[5] = 0.0  # a -0.0 / +0.0 score tie across rows
    kk = kk.to(DEVICE)
    excl = csr([[1], [], [0, 2]])
    for variant, kw in VARIANTS:
        v, i = tri(q, kk, k, excl, variant, **kw)
        rv, ri = ref_topk(q, kk, k, *excl)
        assert torch.equal(i, ri), variant  # NaN keys rank as -inf, by index; then the -1 slots
        assert torch.allclose(v, rv, rtol=1e-5, atol=1e-6), variant  # summation order: last bits
        assert torch.equal(torch.isneginf(v), torch.isneginf(rv)), variant


def test_float16_and_float64_inputs(backend):
    g = torch.Generator().manual_seed(3)
    n_q, n_k, d, k = 4, 60, 16, 8
    q = torch.randn(n_q, d, generator=g).to(DEVICE)
    kk = torch.randn(n_k, d, generator=g).to(DEVICE)
    excl = csr([[0], [1, 2], [], [59]])
    qh, kh = q.half(), kk.half()
    v, i = tri(qh, kh, k, excl, "buffer", block_m=16, block_n=16)
    rv, ri = ref_topk(qh, kh, k, *excl)
    tie_aware_equal(qh.float(), kh.float(), excl, v, i, rv, ri)
    v, i = tri(q.double(), kk.double(), k, excl, "buffer", block_m=16, block_n=16)
    rv, ri = ref_topk(q, kk, k, *excl)  # float64 is ranked as float32 by this backend
    tie_aware_equal(q, kk, excl, v, i, rv, ri)


def test_bfloat16_inputs(backend):
    if DEVICE == "cpu":
        pytest.skip(
            "the Triton interpreter misreads bfloat16 tensors (numpy has no bfloat16); "
            "checked on the GPU by bench/gpu.py"
        )
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 16, generator=g).to(DEVICE, torch.bfloat16)
    kk = torch.randn(60, 16, generator=g).to(DEVICE, torch.bfloat16)
    excl = no_excl(4)
    v, i = tri(q, kk, 8, excl, "buffer", block_m=16, block_n=16)
    rv, ri = ref_topk(q, kk, 8, *excl)
    tie_aware_equal(q.float(), kk.float(), excl, v, i, rv, ri)


def test_public_api_and_bad_variant(backend):
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-1, 2, (3, 4), generator=g).float().to(DEVICE)
    kk = torch.randint(-1, 2, (40, 4), generator=g).float().to(DEVICE)
    excl = (torch.tensor([0, 2, 2, 3]), torch.tensor([7, 3, 39]))
    v, i = kdfast.topk_scores(q, kk, 5, exclude=excl, backend="triton")
    rv, ri = kdfast.topk_scores(q, kk, 5, exclude=excl, backend="torch")
    assert torch.equal(i, ri) and torch.equal(v, rv)
    with pytest.raises(ValueError, match="variant"):
        tri(q, kk, 5, no_excl(3), "bogus")


@settings(max_examples=4, deadline=None)
@given(
    n_q=st.integers(1, 4), n_k=st.integers(1, 40), k=st.integers(1, 12), seed=st.integers(0, 2**16)
)
def test_property_matches_reference_on_integer_scores(backend, n_q, n_k, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (n_q, 4), generator=g).float().to(DEVICE)
    kk = torch.randint(-2, 3, (n_k, 4), generator=g).float().to(DEVICE)
    rows = [
        torch.randint(
            0, n_k, (int(torch.randint(0, n_k + 1, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n_q)
    ]
    excl = csr(rows)
    v, i = tri(q, kk, k, excl, "buffer", block_m=16, block_n=16)
    rv, ri = ref_topk(q, kk, k, *excl)
    assert torch.equal(i, ri)
    assert torch.equal(v, rv)
