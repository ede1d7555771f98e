"""kdfast.rank_of_ids: every backend against the brute-force definition (ties, exclusions, NaN/inf,
-0, m = 1, excluded and repeated ids, padding), against topk_scores' positions for every score
function, edge cases and bad input. Triton runs in the interpreter on tiny shapes only."""

import pytest
import torch

import kdfast
from kdfast._core import backend as _backend
from kdfast._core.csr import as_csr
from kdfast.ops.rank_of_ids import cpu
from kdfast.ops.rank_of_ids.reference import brute_force
from tests.conftest import backend_params, device_of

BACKENDS = backend_params("torch", "cpp", "triton")


def rand_csr(n_q, n_k, gen, max_per_row=5):
    """Unsorted exclusion rows with repeated ids (some rows empty)."""
    counts = torch.randint(0, max_per_row + 1, (n_q,), generator=gen)
    indptr = torch.zeros(n_q + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = torch.randint(0, n_k, (int(indptr[-1]),), generator=gen)
    if indices.numel() > 1:
        indices[1::3] = indices[0::3][: indices[1::3].numel()]
    return indptr, indices


def oracle(q, keys, ids, exclude):
    """The definition on the dense score matrix, computed in the inputs' dtype (integer data: exact;
    an overflow is then the same one the backends meet)."""
    ip, ix = as_csr(exclude, "exclude", q.shape[0], keys.shape[0])
    return brute_force(q, keys, ids, ip, ix)


def case(n_q, n_k, d, m, gen, dtype=torch.float32, special=True):
    """Integer embeddings (exact scores, many ties), ids with padding, repeats and excluded ids;
    with special: a NaN key, keys whose products overflow to +-inf, a zero key (scores -0/+0)."""
    q = torch.randint(-2, 3, (n_q, d), generator=gen).to(dtype)
    keys = torch.randint(-2, 3, (n_k, d), generator=gen).to(dtype)
    if special and n_k >= 4:
        keys[0, 0] = float("nan")
        keys[1] = 0.0  # one huge coordinate: its score overflows (+-2 x) or not, in any order
        keys[1, 0] = 3e38 if dtype == torch.float32 else 1e308
        keys[2] = -0.0
        keys[3, 0] = float("inf")
    ids = torch.randint(0, n_k, (n_q, m), generator=gen)
    if m > 2:
        ids[:, 1] = -1  # padding
        ids[:, 2] = ids[:, 0]  # a repeated id
    ip, ix = rand_csr(n_q, n_k, gen)
    if m > 3 and ix.numel():
        ids[0, 3] = ix[0]  # an excluded id
    if special and m > 4 and n_k >= 4:
        ids[:, 4] = torch.arange(n_q) % 4  # the NaN, overflowing and zero keys themselves
    return q, keys, ids, (ip, ix)


SHAPES = [  # n_q, n_k, d, m
    (1, 1, 1, 1),
    (3, 5, 2, 1),  # m = 1
    (7, 13, 3, 5),
    (9, 61, 7, 8),
    (5, 40, 4, 40),  # m = n_k
    (33, 300, 7, 10),
]
TINY = [(1, 1, 1, 1), (3, 5, 2, 1), (7, 13, 3, 5), (9, 40, 7, 6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_brute_force(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    dev = device_of(backend)
    for n_q, n_k, d, m in TINY if backend == "triton" else SHAPES:
        q, keys, ids, (ip, ix) = case(n_q, n_k, d, m, gen, dtype)
        if backend == "triton":  # it computes float64 inputs in float32 (1e308 -> inf)
            want = oracle(q.float(), keys.float(), ids, (ip, ix))
        else:
            want = oracle(q, keys, ids, (ip, ix))
        got = kdfast.rank_of_ids(
            q.to(dev), keys.to(dev), ids.to(dev), exclude=(ip.to(dev), ix.to(dev)), backend=backend
        )
        assert got.dtype == torch.int64 and got.shape == ids.shape
        assert torch.equal(got.cpu(), want), (n_q, n_k, d, m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_rule_and_specials_by_hand(backend):
    """Equal scores: the lower index ranks higher; NaN and overflowing scores rank as -inf (ties by
    index among them); -0 == +0; an excluded id gets its place among the others; -1 -> -1."""
    dev = device_of(backend)
    keys = torch.tensor([[1.0], [2.0], [1.0], [float("nan")], [-0.0], [0.0], [3e38], [2.0]])
    q = torch.tensor([[2.0], [-2.0]])
    ids = torch.tensor([[0, 2, 1, 7, 3, 4, 5, 6, -1], [0, 2, 1, 7, 3, 4, 5, 6, -1]])
    exclude = (torch.tensor([0, 1, 1]), torch.tensor([1]))  # row 0 excludes key 1
    # row 0 scores: 2 (4, excluded) 2 nan -0 0 inf 4: order 7, 0, 2, 4, 5, then 3, 6 as -inf; the
    # excluded key 1 would come first (4, index 1 < 7)
    # row 1 scores: -2 -4 -2 nan 0 -0 -inf -4: order 4, 5, 0, 2, 1, 7, 3, 6
    want = torch.tensor([[1, 2, 0, 0, 5, 3, 4, 6, -1], [2, 3, 4, 5, 6, 0, 1, 7, -1]])
    got = kdfast.rank_of_ids(
        q.to(dev), keys.to(dev), ids.to(dev), exclude=tuple(t.to(dev) for t in exclude),
        backend=backend,
    )  # fmt: skip
    assert torch.equal(got.cpu(), want)
    assert torch.equal(want, oracle(q, keys, ids, exclude))


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
@pytest.mark.parametrize("score", ["dot", "cosine", "neg_sqeuclidean"])
def test_rank_is_the_topk_position(backend, score):
    """For a non-excluded id, its rank is its position in topk_scores(..., k=n_k) of the same
    score function and key bias."""
    gen = torch.Generator().manual_seed(3)
    n_q, n_k, d = 11, 90, 5
    q, keys, _, excl = case(n_q, n_k, d, 1, gen, special=False)
    bias = torch.randint(-3, 4, (n_k,), generator=gen).float()
    _, order = kdfast.topk_scores(
        q, keys, n_k, exclude=excl, score=score, key_bias=bias, backend=backend
    )
    ids = order[:, :: max(1, n_k // 17)]
    ids = torch.where(ids >= 0, ids, torch.zeros_like(ids))
    valid = order[:, :: max(1, n_k // 17)] >= 0
    got = kdfast.rank_of_ids(
        q, keys, ids, exclude=excl, score=score, key_bias=bias, backend=backend
    )
    pos = torch.arange(0, n_k, max(1, n_k // 17)).expand_as(ids)
    assert torch.equal(got[valid], pos[valid])


@pytest.mark.skipif(not _backend.backends()["cpp"][0], reason="no C++ extension")
def test_cpp_isa_variants_and_threads_agree():
    gen = torch.Generator().manual_seed(5)
    q, keys, ids, excl = case(37, 1000, 9, 12, gen)
    ip, ix = as_csr(excl, "exclude", 37, 1000)
    want = oracle(q, keys, ids, excl)
    ext = _backend.require_ext()
    for isa in ("avx512", "avx2", "generic"):
        if isa != "generic" and ext.topk_isa("auto") not in (isa, "avx512"):
            continue
        assert torch.equal(cpu.rank_of_ids(q, keys, ids, ip, ix, isa=isa), want), isa
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kdfast.rank_of_ids(q, keys, ids, exclude=excl, backend="cpp")
        torch.set_num_threads(2)
        two = kdfast.rank_of_ids(q, keys, ids, exclude=excl, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, want) and torch.equal(two, want)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_gaussian_scores_agree_up_to_near_ties(backend):
    """Continuous scores: the float32 ranks equal the float64 definition's but where two scores are
    closer than float32 rounding."""
    gen = torch.Generator().manual_seed(11)
    q, keys = torch.randn(20, 16, generator=gen), torch.randn(3000, 16, generator=gen)
    ids = torch.randint(0, 3000, (20, 30), generator=gen)
    excl = rand_csr(20, 3000, gen, 50)
    got = kdfast.rank_of_ids(q, keys, ids, exclude=excl, backend=backend)
    want = oracle(q.double(), keys.double(), ids, excl)
    assert (got - want).abs().max() <= 2
    assert (got == want).double().mean() >= 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges(backend):
    dev = device_of(backend)
    q, keys = torch.ones(3, 2, device=dev), torch.ones(4, 2, device=dev)
    empty_ids = torch.zeros(3, 0, dtype=torch.int64, device=dev)
    assert kdfast.rank_of_ids(q, keys, empty_ids, backend=backend).shape == (3, 0)
    pad = torch.full((3, 2), -1, device=dev)
    assert (kdfast.rank_of_ids(q, keys, pad, backend=backend) == -1).all()
    no_q = kdfast.rank_of_ids(q[:0], keys, empty_ids[:0], backend=backend)
    assert no_q.shape == (0, 0)
    # every key tied: rank = the index among the non-excluded keys
    ids = torch.tensor([[3, 0, 2]] * 3, device=dev)
    want = torch.tensor([[3, 0, 2]] * 3)
    assert torch.equal(kdfast.rank_of_ids(q, keys, ids, backend=backend).cpu(), want)
    # every key excluded: rank 0
    excl = (torch.tensor([0, 4, 4, 4]), torch.tensor([0, 1, 2, 3]))
    got = kdfast.rank_of_ids(q, keys, ids, exclude=tuple(t.to(dev) for t in excl), backend=backend)
    assert torch.equal(got[0].cpu(), torch.zeros(3, dtype=torch.int64))
    # ints of another dtype are taken
    got32 = kdfast.rank_of_ids(q, keys, ids.int(), backend=backend)
    assert torch.equal(got32.cpu(), want)


def test_bad_input_names_the_argument():
    q, keys = torch.ones(3, 2), torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"ids holds ids outside \[0, 4\) or -1"):
        kdfast.rank_of_ids(q, keys, torch.tensor([[4], [0], [0]]))
    with pytest.raises(ValueError, match=r"ids holds ids outside"):
        kdfast.rank_of_ids(q, keys, torch.tensor([[-2], [0], [0]]))
    with pytest.raises(ValueError, match="ids must have 3 rows"):
        kdfast.rank_of_ids(q, keys, torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="ids must be an integer"):
        kdfast.rank_of_ids(q, keys, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="exclude"):
        kdfast.rank_of_ids(q, keys, torch.zeros(3, 1, dtype=torch.int64), exclude=([0, 1], [0]))
    with pytest.raises(ValueError, match="ids holds ids outside"):  # no keys: only padding is valid
        kdfast.rank_of_ids(q, keys[:0], torch.zeros(3, 1, dtype=torch.int64))
    assert (kdfast.rank_of_ids(q, keys[:0], torch.full((3, 1), -1)) == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_rank_clamps_exactly(backend):
    """max_rank: min(rank, max_rank), ties and exclusions included; on cpp across several chunks of
    keys (the kernel settles ids once max_rank keys are above them and then skips keys)."""
    gen = torch.Generator().manual_seed(13)
    dev = device_of(backend)
    n_q, n_k, d, m = (5, 40, 3, 6) if backend == "triton" else (23, 9000, 4, 30)
    q, keys, ids, excl = case(n_q, n_k, d, m, gen)
    excl = rand_csr(n_q, n_k, gen, 40 if n_k > 1000 else 5)
    full = oracle(q, keys, ids, excl)
    # near-top ids too: some rows' ids rank high, some low
    _, order = kdfast.topk_scores(q, keys, min(n_k, 50), exclude=excl, backend="torch")
    ids[::2, :5] = order[::2, :5].clamp_min(0)
    full = oracle(q, keys, ids, excl)
    for cap in (0, 1, 7, 200, n_k + 5):
        got = kdfast.rank_of_ids(
            q.to(dev), keys.to(dev), ids.to(dev), exclude=tuple(t.to(dev) for t in excl),
            max_rank=cap, backend=backend,
        )  # fmt: skip
        want = torch.where(full >= 0, full.clamp_max(cap), full)
        assert torch.equal(got.cpu(), want), cap
