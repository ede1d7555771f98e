"""Samplers: distribution (chi-square), exclusions, no repeats, sortedness, errors."""

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdfast._core import backend as _backend
from kdfast.sampling import exclusion_keys, rank_discounted_sample, uniform_excluding_sample
from tests.conftest import backend_params

BACKENDS = backend_params("torch", "cpp")
USABLE = ["torch"] + (["cpp"] if _backend.backends()["cpp"][0] else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_sample_first_draw_follows_exp_discount(backend):
    # with K = 1 the one draw has p(r) ~ exp(-r/T) exactly
    g = torch.Generator().manual_seed(0)
    n, T, rows = 30, 5.0, 20000
    pos = rank_discounted_sample(rows, n, 1, T, generator=g, backend=backend)[:, 0]
    obs = np.bincount(pos.numpy(), minlength=n)
    p = np.exp(-np.arange(1, n + 1) / T)
    p /= p.sum()
    # merge the sparse tail into one cell so every expected count is >= 5
    exp = p * rows
    keep = np.cumsum(exp[::-1])[::-1] >= 5  # ranks whose tail still has mass >= 5 stay separate
    cut = int(keep.sum()) - 1
    obs_c = np.append(obs[:cut], obs[cut:].sum())
    exp_c = np.append(exp[:cut], exp[cut:].sum())
    assert scipy.stats.chisquare(obs_c, exp_c).pvalue > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_sample_marginal_matches_sequential_draws(backend):
    # marginal inclusion frequency of each rank for K = 3 vs an explicit successive-draw simulation
    n, k, T, rows = 12, 3, 4.0, 20000
    g = torch.Generator().manual_seed(1)
    pos = rank_discounted_sample(rows, n, k, T, generator=g, backend=backend)
    obs = np.bincount(pos.flatten().numpy(), minlength=n)
    rng = np.random.default_rng(2)
    w = np.exp(-np.arange(1, n + 1) / T)
    sim = np.zeros(n)
    for _ in range(rows):
        sim[rng.choice(n, size=k, replace=False, p=w / w.sum())] += 1
    # two-sample chi-square (contingency table of counts)
    assert scipy.stats.chi2_contingency(np.stack([obs, sim])).pvalue > 1e-3


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(0, 20),
    n=st.integers(1, 60),
    k=st.integers(1, 60),
    T=st.floats(0.1, 50),
    seed=st.integers(0, 999),
    backend=st.sampled_from(USABLE),
)
def test_rank_sample_sorted_distinct_in_range(rows, n, k, T, seed, backend):
    k = min(k, n)
    pos = rank_discounted_sample(
        rows, n, k, T, generator=torch.Generator().manual_seed(seed), backend=backend
    )
    assert pos.shape == (rows, k) and pos.dtype == torch.int64
    if rows:
        assert bool((pos[:, 1:] > pos[:, :-1]).all())
        assert int(pos.min()) >= 0 and int(pos.max()) < n


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_sample_errors(backend):
    with pytest.raises(ValueError, match="temperature"):
        rank_discounted_sample(3, 10, 2, 0.0, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        rank_discounted_sample(3, 10, 2, -1.0, backend=backend)
    with pytest.raises(ValueError, match="n "):
        rank_discounted_sample(3, 4, 5, 1.0, backend=backend)
    with pytest.raises(ValueError, match="k"):
        rank_discounted_sample(3, 4, 0, 1.0, backend=backend)
    with pytest.raises(ValueError, match="n_rows"):
        rank_discounted_sample(-1, 4, 1, 1.0, backend=backend)


def _random_csr(rows, n_ids, max_len, g):
    counts = torch.randint(0, max_len + 1, (rows,), generator=g)
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, torch.randint(0, n_ids, (int(indptr[-1]),), generator=g)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    n_ids=st.integers(5, 80),
    seed=st.integers(0, 999),
    frac=st.floats(0.05, 1.0),
    backend=st.sampled_from(USABLE),
)
def test_uniform_never_excluded_never_repeated(rows, n_ids, seed, frac, backend):
    g = torch.Generator().manual_seed(seed)
    indptr, indices = _random_csr(rows, n_ids, n_ids // 3, g)
    extra = torch.randint(-1, n_ids, (rows, 3), generator=g)
    banned = [
        set(indices[indptr[r] : indptr[r + 1]].tolist()) | set(extra[r][extra[r] >= 0].tolist())
        for r in range(rows)
    ]
    size = max(1, int(frac * min(n_ids - len(b) for b in banned)))
    out = uniform_excluding_sample(
        rows, n_ids, size, exclude=(indptr, indices), extra=extra, generator=g, backend=backend
    )
    assert out.shape == (rows, size)
    for r in range(rows):
        row = out[r].tolist()
        assert len(set(row)) == size
        assert not (set(row) & banned[r])
        assert all(0 <= x < n_ids for x in row)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_is_uniform_over_available(backend):
    g = torch.Generator().manual_seed(3)
    n_ids, rows, size = 20, 4000, 3
    ex = (torch.arange(0, 4 * rows + 1, 4), torch.tensor([0, 5, 5, 7]).repeat(rows))
    out = uniform_excluding_sample(
        rows,
        n_ids,
        size,
        exclude=ex,
        extra=torch.tensor([[19]]).repeat(rows, 1),
        generator=g,
        backend=backend,
    )
    counts = np.bincount(out.flatten().numpy(), minlength=n_ids)
    avail = [i for i in range(n_ids) if i not in (0, 5, 7, 19)]
    assert counts[[0, 5, 7, 19]].sum() == 0
    assert scipy.stats.chisquare(counts[avail]).pvalue > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_exhausts_a_row_exactly(backend):
    g = torch.Generator().manual_seed(4)
    ex = (torch.tensor([0, 7, 7]), torch.tensor([0, 1, 2, 3, 4, 5, 6]))
    out = uniform_excluding_sample(2, 10, 3, exclude=ex, generator=g, backend=backend)
    assert sorted(out[0].tolist()) == [7, 8, 9]


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_errors(backend):
    ex = (torch.tensor([0, 7, 7]), torch.tensor([0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="available"):
        uniform_excluding_sample(2, 10, 4, exclude=ex, backend=backend)
    with pytest.raises(ValueError, match="extra"):
        uniform_excluding_sample(2, 10, 1, extra=torch.tensor([[11], [0]]), backend=backend)
    with pytest.raises(ValueError, match="exclude"):
        uniform_excluding_sample(3, 10, 1, exclude=ex, backend=backend)
    with pytest.raises(ValueError, match="size"):
        uniform_excluding_sample(2, 10, 0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_reproducible(backend):
    a = uniform_excluding_sample(
        5, 50, 4, generator=torch.Generator().manual_seed(9), backend=backend
    )
    b = uniform_excluding_sample(
        5, 50, 4, generator=torch.Generator().manual_seed(9), backend=backend
    )
    assert torch.equal(a, b)

    def rank():
        return rank_discounted_sample(
            4, 30, 5, 2.0, generator=torch.Generator().manual_seed(9), backend=backend
        )

    assert torch.equal(rank(), rank())


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_exclusion_keys_match_exclude_and_extra(backend):
    n_rows, n_ids = 7, 60
    gen = torch.Generator().manual_seed(3)
    indptr = torch.tensor([0, 3, 3, 10, 12, 20, 21, 25])
    indices = torch.randint(0, n_ids, (25,), generator=gen)
    extra = torch.randint(-1, n_ids, (n_rows, 5), generator=gen)
    a = uniform_excluding_sample(
        n_rows,
        n_ids,
        9,
        exclude=(indptr, indices),
        extra=extra,
        generator=torch.Generator().manual_seed(11),
        backend=backend,
    )
    keys = exclusion_keys(n_rows, n_ids, (indptr, indices), extra)
    b = uniform_excluding_sample(
        n_rows,
        n_ids,
        9,
        excluded_keys=keys,
        generator=torch.Generator().manual_seed(11),
        backend=backend,
    )
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        uniform_excluding_sample(
            n_rows, n_ids, 9, exclude=(indptr, indices), excluded_keys=keys, backend=backend
        )
    with pytest.raises(ValueError, match="n_rows"):
        uniform_excluding_sample(n_rows + 1, n_ids, 9, excluded_keys=keys, backend=backend)


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_cpp_samples_do_not_depend_on_thread_count(backend):
    top = torch.stack(
        [torch.randperm(300, generator=torch.Generator().manual_seed(r))[:50] for r in range(500)]
    )
    keys = exclusion_keys(500, 300, None, top)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(
                (
                    rank_discounted_sample(
                        500,
                        200,
                        20,
                        10.0,
                        generator=torch.Generator().manual_seed(5),
                        backend=backend,
                    ),
                    uniform_excluding_sample(
                        500,
                        300,
                        30,
                        excluded_keys=keys,
                        generator=torch.Generator().manual_seed(5),
                        backend=backend,
                    ),
                )
            )
    finally:
        torch.set_num_threads(before)
    for a, b in outs[1:]:
        assert torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1])


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_cpp_rank_sample_matches_torch_law_at_rrd_defaults(backend):
    """N = 500, K = 40, T = 10 (the RRD defaults, where the cpp sampler skips most positions): the
    inclusion frequency of every rank agrees with the torch Gumbel-top-k sampler (two-sample
    test)."""
    rows, n, k, T = 20000, 500, 40, 10.0
    a = rank_discounted_sample(
        rows, n, k, T, generator=torch.Generator().manual_seed(1), backend=backend
    )
    b = rank_discounted_sample(
        rows, n, k, T, generator=torch.Generator().manual_seed(2), backend="torch"
    )
    ca, cb = (np.bincount(x.flatten().numpy(), minlength=n) for x in (a, b))
    # every rank on its own until the tail holds fewer than 50 draws, then the tail as one cell
    hi = int(np.argmax(np.cumsum((ca + cb)[::-1])[::-1] < 50))
    table = np.stack([np.append(ca[:hi], ca[hi:].sum()), np.append(cb[:hi], cb[hi:].sum())])
    # a cell counts the rows that include the rank (binomial per rank, not multinomial): a
    # two-proportion z-test per rank, Bonferroni over the ranks
    pa, pb = table / rows
    pm = (pa + pb) / 2
    z = np.abs(pa - pb) / (np.sqrt(2 * pm * (1 - pm) / rows) + 1.0 / rows)
    assert z.max() < scipy.stats.norm.isf(1e-3 / (2 * len(z))), (z.max(), int(np.argmax(z)))
    # and the law is the steep one: the top ranks nearly always in
    assert table[0, :10].sum() > 0.99 * 10 * rows


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_cpp_rejects_inconsistent_keys(backend):
    keys = (
        torch.tensor([3, 25]),
        torch.tensor([1, 1]),
    )  # row 1's key 25 = 2 * 10 + 5 is past row 1
    with pytest.raises(ValueError, match="row 1"):
        uniform_excluding_sample(2, 10, 2, excluded_keys=keys, backend=backend)
    with pytest.raises(ValueError, match="exclusion_keys"):
        uniform_excluding_sample(
            2, 10, 2, excluded_keys=(torch.tensor([3]), torch.tensor([1, 1])), backend=backend
        )


def test_backend_argument_checked(monkeypatch):
    with pytest.raises(RuntimeError, match="no triton backend"):
        rank_discounted_sample(2, 5, 2, 1.0, backend="triton")
    # a backend the samplers lack: their automatic choice
    monkeypatch.setenv("KDFAST_BACKEND", "triton")
    assert rank_discounted_sample(2, 5, 2, 1.0).shape == (2, 2)
    with pytest.raises(ValueError, match="backend"):
        uniform_excluding_sample(2, 5, 2, backend="gpu")
