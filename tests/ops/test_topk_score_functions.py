"""kdfast.topk_scores(score=..., key_bias=...): every score function on every backend against the
oracle's direct computation (kdfast.ops.topk.reference.score_tile in float64), exact ties, the
non-finite rule, and bad arguments. The Triton backend runs its GPU code path under the interpreter
(tiny shapes)."""

import pytest
import torch

import kdfast
from kdfast.ops.topk import reference
from tests.conftest import backend_params, device_of

BACKENDS = backend_params("torch", "cpp", "triton")
SCORES = ["dot", "cosine", "neg_sqeuclidean"]


def oracle(q, keys, k, exclude=None, score="dot", key_bias=None):
    n_q, n_k = q.shape[0], keys.shape[0]
    ip, ix = kdfast.as_csr(exclude, "exclude", n_q, n_k, optional=True, device=q.device)
    bias = None if key_bias is None else key_bias.double()
    return reference.topk_scores(q.double(), keys.double(), k, ip, ix, score=score, key_bias=bias)


def test_score_tile_is_each_function_by_definition():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g)
    keys = keys.double()
    keys[2] = 0.0
    b = torch.randn(5, generator=g, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            dot = float(q[i] @ keys[j])
            nq, nk = float(q[i].norm()), float(keys[j].norm())
            cos = dot / (nq * nk) if nk > 0 else 0.0
            dist = float(((q[i] - keys[j]) ** 2).sum())
            for score, want in (("dot", dot), ("cosine", cos), ("neg_sqeuclidean", -dist)):
                got = reference.score_tile(q[i : i + 1], keys[j : j + 1], score, b[j : j + 1])
                assert float(got) == pytest.approx(want + float(b[j]), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "bias"])
def test_every_score_function_matches_the_oracle(backend, score, biased):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(1)
    n_q, n_k, d, k = 9, 40, 7, 6
    q = torch.randn(n_q, d, generator=g) * 2
    keys = torch.randn(n_k, d, generator=g) * 2
    keys[5] = 0.0  # a key of norm 0 (cosine 0)
    bias = torch.randn(n_k, generator=g) if biased else None
    counts = torch.randint(0, 4, (n_q,), generator=g)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    excl = (indptr, torch.randint(0, n_k, (int(indptr[-1]),), generator=g))
    want_v, want_i = oracle(q, keys, k, excl, score, bias)
    on = lambda t: None if t is None else t.to(dev)
    got_v, got_i = kdfast.topk_scores(
        on(q),
        on(keys),
        k,
        exclude=tuple(on(t) for t in excl),
        score=score,
        key_bias=on(bias),
        backend=backend,
    )
    assert torch.equal(got_i.cpu(), want_i)
    torch.testing.assert_close(got_v.cpu(), want_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["dot", "neg_sqeuclidean"])
def test_exact_ties_go_to_the_lower_index(backend, score):
    # small integers and integer biases: every score is exact, ties are frequent, and the order
    # (ties to the lower index) must be the oracle's exactly, values included
    dev = device_of(backend)
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-2, 3, (8, 4), generator=g).float()
    keys = torch.randint(-2, 3, (30, 4), generator=g).float()
    bias = torch.randint(-3, 4, (30,), generator=g).float()
    want = oracle(q, keys, 12, None, score, bias)
    got = kdfast.topk_scores(
        q.to(dev), keys.to(dev), 12, score=score, key_bias=bias.to(dev), backend=backend
    )
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", SCORES)
def test_non_finite_keys_and_biases_rank_last(backend, score):
    # a key holding a NaN or an inf, or a NaN/inf bias, gives a score that is not finite: it ranks
    # as -inf (after every finite score, ties by index) and is reported as -inf, as for "dot"
    dev = device_of(backend)
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(4, 5, generator=g), torch.randn(12, 5, generator=g)
    bias = torch.randn(12, generator=g)
    keys[1, 2] = float("nan")
    keys[4, 0] = float("inf")
    bias[7] = float("nan")
    bias[9] = float("-inf")
    got_v, got_i = kdfast.topk_scores(
        q.to(dev), keys.to(dev), 12, score=score, key_bias=bias.to(dev), backend=backend
    )
    want_v, want_i = oracle(q, keys, 12, None, score, bias)
    assert torch.equal(got_i.cpu(), want_i)
    assert torch.equal(got_i[:, -4:].cpu(), torch.tensor([[1, 4, 7, 9]] * 4))
    assert bool(torch.isneginf(got_v[:, -4:]).all())
    torch.testing.assert_close(got_v.cpu(), want_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_is_scale_free(backend):
    # rows of norm 1e20 or 1e-25 in float32 (squares overflow / underflow) rank by direction
    dev = device_of(backend)
    g = torch.Generator().manual_seed(4)
    q, keys = torch.randn(3, 6, generator=g), torch.randn(20, 6, generator=g)
    scale = torch.ones(20, 1)
    scale[::3] = 1e20
    scale[1::3] = 1e-25
    want = kdfast.topk_scores(q, keys, 5, score="cosine", backend="torch")
    got = kdfast.topk_scores(
        q.to(dev) * 1e-22, (keys * scale).to(dev), 5, score="cosine", backend=backend
    )
    assert torch.equal(got[1].cpu(), want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-6)


def test_neg_sqeuclidean_values_are_exact_distances():
    # the ranking goes through 2<q, k> - ||k||^2; the values returned are -||q - k||^2 computed
    # from the differences, exact even where that form cancels (keys far from the origin)
    g = torch.Generator().manual_seed(5)
    keys = 1000.0 + torch.randn(50, 3, generator=g)
    q = keys[:4] + 1e-2 * torch.randn(4, 3, generator=g)
    v, i = kdfast.topk_scores(q, keys, 3, score="neg_sqeuclidean", backend="torch")
    want = -((q.double()[:, None, :] - keys.double()[i]) ** 2).sum(-1)
    torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=0)
    assert torch.equal(i[:, 0], torch.arange(4))


def test_compiles_with_every_score_function():
    g = torch.Generator().manual_seed(6)
    q, keys, bias = torch.randn(5, 4, generator=g), torch.randn(17, 4, generator=g), torch.randn(17)

    def f(q, keys, bias):
        return [kdfast.topk_scores(q, keys, 4, score=s, key_bias=bias) for s in SCORES]

    eager = f(q, keys, bias)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, keys, bias)
    for (ev, ei), (cv, ci) in zip(eager, compiled):
        assert torch.equal(ei, ci) and torch.equal(ev, cv)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"score": "l2"}, ValueError, "score must be one of"),
        ({"key_bias": torch.zeros(16)}, ValueError, "key_bias must have one value per key"),
        (
            {"key_bias": torch.zeros(17, dtype=torch.int64)},
            TypeError,
            "key_bias must be a floating",
        ),
        ({"key_bias": torch.zeros(17, 1)}, ValueError, "key_bias must be 1-D"),
        ({"key_bias": torch.zeros(17, device="meta")}, ValueError, "same device"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, exc, match):
    q, keys = torch.randn(5, 4), torch.randn(17, 4)
    with pytest.raises(exc, match=match):
        kdfast.topk_scores(q, keys, 3, **kwargs)
