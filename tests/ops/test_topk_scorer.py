"""kdfast.topk_from_scorer: the top-k of any score callable, tile by tile, with the order rules of
kdfast.topk_scores."""

import pytest
import torch

import kdfast


def dense_topk(scores, k, exclude=None):
    """The oracle: the full score matrix, exclusions at -inf key, ranked by (score desc, index)."""
    s = scores.double().clone()
    n_q, n_k = s.shape
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("-inf")))
    banned = torch.zeros(n_q, n_k, dtype=torch.bool)
    if exclude is not None:
        ip, ix = exclude
        for r in range(n_q):
            banned[r, ix[ip[r] : ip[r + 1]]] = True
    values = torch.full((n_q, k), float("-inf"), dtype=torch.float32)
    index = torch.full((n_q, k), -1, dtype=torch.int64)
    for r in range(n_q):
        order = sorted(
            (j for j in range(n_k) if not banned[r, j]), key=lambda j: (-float(s[r, j]), j)
        )[:k]
        index[r, : len(order)] = torch.tensor(order, dtype=torch.int64)
        values[r, : len(order)] = s[r, order].float()
    return values, index


class Recorder:
    """A scorer over a fixed score matrix that records the tile shapes it was asked for."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def __call__(self, q, keys):
        self.calls.append((q.numel(), keys.numel()))
        return self.scores[q][:, keys]


def test_dot_scorer_equals_topk_scores_for_any_tiles():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(37, 8, generator=g), torch.randn(101, 8, generator=g)
    counts = torch.randint(0, 5, (37,), generator=g)
    ip = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    excl = (ip, torch.randint(0, 101, (int(ip[-1]),), generator=g))
    want = kdfast.topk_scores(users, items, 9, exclude=excl, backend="torch")
    for qt, kt in ((1, 1), (5, 17), (37, 101), (64, 7)):
        got = kdfast.topk_from_scorer(
            lambda q, k: users[q] @ items[k].T, 37, 101, 9, exclude=excl, query_tile=qt, key_tile=kt
        )
        # the same order; values to the last bits of the products (tile shapes change the GEMM)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_mlp_scorer_against_dense_ranking_and_tile_bound():
    # a score that does not factorise: an MLP over the concatenated pair
    g = torch.Generator().manual_seed(1)
    eu, ei = torch.randn(23, 4, generator=g), torch.randn(300, 4, generator=g)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1))

    def score(q, k):
        pairs = torch.cat(
            [eu[q][:, None].expand(-1, k.numel(), -1), ei[k][None].expand(q.numel(), -1, -1)], -1
        )
        return mlp(pairs)[..., 0]

    with torch.no_grad():
        dense = score(torch.arange(23), torch.arange(300))
    rec = Recorder(dense)
    got = kdfast.topk_from_scorer(rec, 23, 300, 12, tile_elems=500, key_tile=64)
    want = dense_topk(dense, 12)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert max(q * n for q, n in rec.calls) <= 500  # never more than one tile of pairs
    assert sum(q * n for q, n in rec.calls) == 23 * 300  # each pair scored once
    direct = kdfast.topk_from_scorer(score, 23, 300, 12, tile_elems=500, key_tile=64)
    assert torch.equal(direct[1], want[1])


def test_ties_non_finite_exclusions_and_padding():
    # integer scores (many exact ties: to the lower index), NaN/+-inf scores (rank as -inf and
    # are reported as -inf), -0.0 == 0.0, excluded keys never returned, k > allowed keys padded
    g = torch.Generator().manual_seed(2)
    s = torch.randint(-2, 3, (6, 15), generator=g).float()
    s[0, 3], s[1, 4], s[2, 5] = float("nan"), float("inf"), float("-inf")
    s[3, :] = -0.0
    s[3, 7] = 0.0
    ip = torch.tensor([0, 2, 2, 5, 5, 5, 20])
    ix = torch.cat([torch.tensor([1, 1, 0, 2, 9]), torch.arange(15)])
    got = kdfast.topk_from_scorer(Recorder(s), 6, 15, 16, exclude=(ip, ix), key_tile=4)
    want = dense_topk(s, 16, (ip, ix))
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert bool((got[1][5] == -1).all()) and bool(torch.isneginf(got[0][5]).all())
    row = got[1][1].tolist()  # +inf ranks as -inf: after every finite score, reported as -inf
    assert bool(torch.isfinite(got[0][1, : row.index(4)]).all()) and got[0][1, row.index(4)] < 0
    assert torch.isneginf(got[0][1, row.index(4)])


def test_query_ids_rank_a_subset_in_the_given_order():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(20, 30, generator=g)
    ids = torch.tensor([7, 2, 19, 2])
    got = kdfast.topk_from_scorer(Recorder(s), 20, 30, 5, query_ids=ids)
    want = dense_topk(s[ids], 5)
    assert torch.equal(got[1], want[1])


def test_progress_bar_and_device():
    s = torch.randn(4, 9)
    v, i = kdfast.topk_from_scorer(Recorder(s), 4, 9, 3, progress=True, device="cpu")
    assert i.device.type == "cpu" and v.dtype == torch.float32 and i.dtype == torch.int64


@pytest.mark.parametrize(
    "fn, kwargs, exc, match",
    [
        ("not callable", {}, TypeError, "score_fn must be callable"),
        (lambda q, k: [[0.0]], {}, TypeError, "score_fn must return a torch.Tensor"),
        (
            lambda q, k: torch.zeros(q.numel(), k.numel(), dtype=torch.int64),
            {},
            TypeError,
            "floating",
        ),
        (lambda q, k: torch.zeros(q.numel(), k.numel() + 1), {}, ValueError, r"shape \[len"),
        (lambda q, k: torch.zeros(q.numel(), k.numel()), {"k": 0}, ValueError, "k must be >= 1"),
        (
            lambda q, k: torch.zeros(q.numel(), k.numel()),
            {"query_ids": torch.tensor([5])},
            ValueError,
            "query_ids",
        ),
        (lambda q, k: torch.zeros(q.numel(), k.numel()), {"key_tile": 0}, ValueError, "key_tile"),
        (lambda q, k: torch.zeros(q.numel(), k.numel()), {"n_keys": 2**32}, ValueError, "n_keys"),
    ],
)
def test_bad_arguments_and_bad_scorers_are_named(fn, kwargs, exc, match):
    args = {"n_queries": 3, "n_keys": 4, "k": 2, **kwargs}
    with pytest.raises(exc, match=match):
        kdfast.topk_from_scorer(fn, **args)
