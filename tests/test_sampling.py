"""Samplers: distribution (chi-square), exclusions, no repeats, sortedness, errors."""
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdfast.sampling import rank_discounted_sample, uniform_excluding_sample


def test_rank_sample_first_draw_follows_exp_discount():
    # with K = 1 the one draw has p(r) ~ exp(-r/T) exactly
    g = torch.Generator().manual_seed(0)
    n, T, rows = 30, 5.0, 20000
    pos = rank_discounted_sample(rows, n, 1, T, generator=g)[:, 0]
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


def test_rank_sample_marginal_matches_sequential_draws():
    # marginal inclusion frequency of each rank for K = 3 vs an explicit successive-draw simulation
    n, k, T, rows = 12, 3, 4.0, 20000
    g = torch.Generator().manual_seed(1)
    pos = rank_discounted_sample(rows, n, k, T, generator=g)
    obs = np.bincount(pos.flatten().numpy(), minlength=n)
    rng = np.random.default_rng(2)
    w = np.exp(-np.arange(1, n + 1) / T)
    sim = np.zeros(n)
    for _ in range(rows):
        sim[rng.choice(n, size=k, replace=False, p=w / w.sum())] += 1
    # two-sample chi-square (contingency table of counts)
    assert scipy.stats.chi2_contingency(np.stack([obs, sim])).pvalue > 1e-3


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(0, 20), n=st.integers(1, 60), k=st.integers(1, 60), T=st.floats(0.1, 50),
       seed=st.integers(0, 999))
def test_rank_sample_sorted_distinct_in_range(rows, n, k, T, seed):
    k = min(k, n)
    pos = rank_discounted_sample(rows, n, k, T, generator=torch.Generator().manual_seed(seed))
    assert pos.shape == (rows, k) and pos.dtype == torch.int64
    if rows:
        assert bool((pos[:, 1:] > pos[:, :-1]).all())
        assert int(pos.min()) >= 0 and int(pos.max()) < n


def test_rank_sample_errors():
    with pytest.raises(ValueError, match="temperature"):
        rank_discounted_sample(3, 10, 2, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        rank_discounted_sample(3, 10, 2, -1.0)
    with pytest.raises(ValueError, match="n "):
        rank_discounted_sample(3, 4, 5, 1.0)
    with pytest.raises(ValueError, match="k"):
        rank_discounted_sample(3, 4, 0, 1.0)
    with pytest.raises(ValueError, match="n_rows"):
        rank_discounted_sample(-1, 4, 1, 1.0)


def _random_csr(rows, n_ids, max_len, g):
    counts = torch.randint(0, max_len + 1, (rows,), generator=g)
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, torch.randint(0, n_ids, (int(indptr[-1]),), generator=g)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), n_ids=st.integers(5, 80), seed=st.integers(0, 999), frac=st.floats(0.05, 1.0))
def test_uniform_never_excluded_never_repeated(rows, n_ids, seed, frac):
    g = torch.Generator().manual_seed(seed)
    indptr, indices = _random_csr(rows, n_ids, n_ids // 3, g)
    extra = torch.randint(-1, n_ids, (rows, 3), generator=g)
    banned = [set(indices[indptr[r]:indptr[r + 1]].tolist()) | set(extra[r][extra[r] >= 0].tolist())
              for r in range(rows)]
    size = max(1, int(frac * min(n_ids - len(b) for b in banned)))
    out = uniform_excluding_sample(rows, n_ids, size, exclude=(indptr, indices), extra=extra, generator=g)
    assert out.shape == (rows, size)
    for r in range(rows):
        row = out[r].tolist()
        assert len(set(row)) == size
        assert not (set(row) & banned[r])
        assert all(0 <= x < n_ids for x in row)


def test_uniform_is_uniform_over_available():
    g = torch.Generator().manual_seed(3)
    n_ids, rows, size = 20, 4000, 3
    ex = (torch.arange(0, 4 * rows + 1, 4), torch.tensor([0, 5, 5, 7]).repeat(rows))
    out = uniform_excluding_sample(rows, n_ids, size, exclude=ex, extra=torch.tensor([[19]]).repeat(rows, 1),
                                   generator=g)
    counts = np.bincount(out.flatten().numpy(), minlength=n_ids)
    avail = [i for i in range(n_ids) if i not in (0, 5, 7, 19)]
    assert counts[[0, 5, 7, 19]].sum() == 0
    assert scipy.stats.chisquare(counts[avail]).pvalue > 1e-3


def test_uniform_exhausts_a_row_exactly():
    g = torch.Generator().manual_seed(4)
    ex = (torch.tensor([0, 7, 7]), torch.tensor([0, 1, 2, 3, 4, 5, 6]))
    out = uniform_excluding_sample(2, 10, 3, exclude=ex, generator=g)
    assert sorted(out[0].tolist()) == [7, 8, 9]


def test_uniform_errors():
    ex = (torch.tensor([0, 7, 7]), torch.tensor([0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="available"):
        uniform_excluding_sample(2, 10, 4, exclude=ex)
    with pytest.raises(ValueError, match="extra"):
        uniform_excluding_sample(2, 10, 1, extra=torch.tensor([[11], [0]]))
    with pytest.raises(ValueError, match="exclude"):
        uniform_excluding_sample(3, 10, 1, exclude=ex)
    with pytest.raises(ValueError, match="size"):
        uniform_excluding_sample(2, 10, 0)


def test_seeded_reproducible():
    a = uniform_excluding_sample(5, 50, 4, generator=torch.Generator().manual_seed(9))
    b = uniform_excluding_sample(5, 50, 4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert torch.equal(rank_discounted_sample(4, 30, 5, 2.0, generator=torch.Generator().manual_seed(9)),
                       rank_discounted_sample(4, 30, 5, 2.0, generator=torch.Generator().manual_seed(9)))


def test_precomputed_exclusion_keys_match_exclude_and_extra():
    from kdfast.sampling import exclusion_keys
    n_rows, n_ids = 7, 60
    gen = torch.Generator().manual_seed(3)
    indptr = torch.tensor([0, 3, 3, 10, 12, 20, 21, 25])
    indices = torch.randint(0, n_ids, (25,), generator=gen)
    extra = torch.randint(-1, n_ids, (n_rows, 5), generator=gen)
    a = uniform_excluding_sample(n_rows, n_ids, 9, exclude=(indptr, indices), extra=extra,
                                 generator=torch.Generator().manual_seed(11))
    keys = exclusion_keys(n_rows, n_ids, (indptr, indices), extra)
    b = uniform_excluding_sample(n_rows, n_ids, 9, excluded_keys=keys, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        uniform_excluding_sample(n_rows, n_ids, 9, exclude=(indptr, indices), excluded_keys=keys)
    with pytest.raises(ValueError, match="n_rows"):
        uniform_excluding_sample(n_rows + 1, n_ids, 9, excluded_keys=keys)
