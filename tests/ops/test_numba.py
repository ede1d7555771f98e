"""What is particular to the numba backend (the contract itself runs in test_contract.py): when
"auto" picks it, its agreement with the reference and the cpp backend on ties, non-finite values,
exclusions and k > n_k, the same bits for any thread count, its threads (no second OpenMP runtime,
concurrent calls), and bad input."""

import subprocess
import sys
import textwrap

import pytest
import torch

import kdfast
from kdfast._core import backend as _backend
from kdfast.ops.plackett_luce import reference as pl_ref
from kdfast.ops.topk import reference as topk_ref
from tests.conftest import backend_params

pytestmark = pytest.mark.skipif(
    not _backend.backends()["numba"][0], reason=f"numba: {_backend.backends()['numba'][1]}"
)
CPP = backend_params("cpp")


def _ints(shape, gen, lo=-3, hi=4, dtype=torch.float32):
    return torch.randint(lo, hi, shape, generator=gen).to(dtype)


def _csr(n_rows, n_cols, gen, per_row=4):
    """Unsorted exclusion rows with repeated ids, some rows empty."""
    counts = torch.randint(0, per_row + 1, (n_rows,), generator=gen)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    return indptr, torch.randint(0, n_cols, (int(indptr[-1]),), generator=gen)


@pytest.fixture
def no_ext(monkeypatch):
    """The C++ extension reported missing (as on a machine without a compiler)."""
    monkeypatch.delenv("KDFAST_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_load_ext", lambda: (None, "not built (test)"))


# ----------------------------------------------------------------------------------- the choice
def test_auto_picks_numba_when_the_extension_is_missing(no_ext, monkeypatch):
    cpu = torch.device("cpu")
    assert _backend.resolve("auto", cpu) == "numba"
    assert _backend.resolve("auto", cpu, dtype=torch.float64) == "numba"
    assert _backend.resolve("auto", cpu, dtype=torch.float16) == "torch"  # numba takes f32/f64
    assert _backend.resolve("auto", cpu, available=("torch", "cpp", "triton")) == "torch"
    assert _backend.resolve("auto", torch.device("meta")) == "torch"
    # the ops dispatch to their numba module
    from kdfast.ops.plackett_luce import numba as pl_numba
    from kdfast.ops.topk import numba as topk_numba

    calls = []
    for mod, name in ((topk_numba, "topk_scores"), (pl_numba, "loss_and_grads")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    gen = torch.Generator().manual_seed(0)
    kdfast.topk_scores(torch.randn(3, 4, generator=gen), torch.randn(9, 4, generator=gen), 2)
    kdfast.plackett_luce_loss(torch.randn(3, 5, generator=gen))
    assert calls == ["topk_scores", "loss_and_grads"]
    # an op without a numba backend runs the reference
    t, s = torch.randn(6, 4, generator=gen), torch.randn(6, 3, generator=gen)
    assert torch.isfinite(kdfast.topology_loss(t, s))


def test_env_names_numba(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "numba")
    cpu = torch.device("cpu")
    assert _backend.resolve("auto", cpu) == "numba"  # the variable wins over the extension
    monkeypatch.setattr(_backend, "_load_ext", lambda: (None, "not built (test)"))
    assert _backend.resolve("auto", cpu) == "numba"
    # an op (or sampler) without numba takes its automatic choice
    assert _backend.resolve("auto", cpu, available=("torch", "cpp")) == "torch"


def test_explicit_numba_errors_say_why():
    with pytest.raises(RuntimeError, match="backend='numba' runs on CPU tensors"):
        _backend.resolve("numba", torch.device("meta"))
    with pytest.raises(TypeError, match="backend='numba' takes float32 or float64"):
        kdfast.topk_scores(torch.randn(2, 3).half(), torch.randn(4, 3).half(), 2, backend="numba")
    with pytest.raises(RuntimeError, match="no numba backend"):
        kdfast.topology_loss(torch.randn(5, 3), torch.randn(5, 2), backend="numba")


def test_threads_never_load_openmp():
    """numba's threads run on tbb or workqueue: torch's libgomp stays the only OpenMP runtime."""
    import numba

    kdfast.topk_scores(torch.randn(3, 4), torch.randn(9, 4), 2, backend="numba")
    assert numba.threading_layer() in _backend.NUMBA_LAYERS
    assert "threading layer" in kdfast.backends()["numba"][1]


# --------------------------------------------------------------------------------------- top-K
def _topk_all(q, keys, k, excl, **kw):
    """{backend: (values, indices)} for torch, numba and (when built) cpp."""
    names = ["torch", "numba"] + (["cpp"] if _backend.ext() is not None else [])
    return {b: kdfast.topk_scores(q, keys, k, exclude=excl, backend=b, **kw) for b in names}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_q,n_k,d,k", [(1, 1, 1, 3), (9, 131, 5, 7), (13, 70, 3, 90)])
def test_topk_matches_reference_and_cpp_on_ties(dtype, n_q, n_k, d, k):
    """Integer scores (every dot product exact, many ties): every backend gives the reference's
    order exactly, ties to the lower index, k > n_k padded with -1 / -inf."""
    gen = torch.Generator().manual_seed(n_q * 1000 + n_k)
    q, keys = _ints((n_q, d), gen, dtype=dtype), _ints((n_k, d), gen, dtype=dtype)
    excl = _csr(n_q, n_k, gen)
    want = topk_ref.topk_scores(q.double(), keys.double(), k, *excl)
    for name, (v, i) in _topk_all(q, keys, k, excl).items():
        assert torch.equal(i, want[1]), name
        assert torch.equal(v, want[0]), name


def test_topk_non_finite_and_signed_zero():
    """NaN, overflowing products (+-inf) rank as -inf, below every finite score, ties by index;
    -0 equals +0 (ties by index)."""
    keys = torch.zeros(12, 4)
    keys[1] = 3e38  # q . k overflows to +inf
    keys[2, 0] = float("nan")
    keys[3] = -3e38  # -inf
    keys[4, 0] = -0.0
    keys[5, 0] = 1.0
    keys[6, 0] = -1.0
    keys[7, :2] = torch.tensor([3e38, -3e38])  # cancels to 0 for q[0], overflows for q[1]
    q = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, 1.0, 1.0]])
    excl = (torch.tensor([0, 1, 1]), torch.tensor([5]))
    out = _topk_all(q, keys, 12, excl)
    for name, (v, i) in out.items():
        assert torch.equal(i, out["torch"][1]), name
        assert torch.equal(v, out["torch"][0]), name
    v, i = out["numba"]
    assert i[0, -1] == -1 and 5 not in i[0].tolist()  # excluded: one empty slot
    # three non-finite scores and the empty slot come last
    assert torch.isneginf(v[0, -4:]).all() and torch.isfinite(v[0, :-4]).all()
    assert not torch.signbit(v[v == 0]).any()


@pytest.mark.parametrize("score", ["dot", "cosine", "neg_sqeuclidean"])
def test_topk_score_functions(score):
    """score= and key_bias= reach the numba backend as dot products (kdfast.ops.topk._as_dot): the
    oracle's exact order on integer inputs (cosine: Gaussian inputs, indices equal)."""
    gen = torch.Generator().manual_seed(3)
    if score == "cosine":
        q, keys, bias = torch.randn(7, 6, generator=gen), torch.randn(50, 6, generator=gen), None
    else:
        q, keys, bias = _ints((7, 6), gen), _ints((50, 6), gen), _ints((50,), gen)
    excl = _csr(7, 50, gen)
    want = topk_ref.topk_scores(
        q.double(), keys.double(), 9, *excl, score=score, key_bias=None if bias is None else bias
    )
    for name, (v, i) in _topk_all(q, keys, 9, excl, score=score, key_bias=bias).items():
        assert torch.equal(i, want[1]), name
        torch.testing.assert_close(v, want[0], rtol=1e-6, atol=1e-6)


def test_topk_same_bits_for_any_thread_count():
    gen = torch.Generator().manual_seed(5)
    q, keys = torch.randn(37, 16, generator=gen), torch.randn(300, 16, generator=gen)
    excl = _csr(37, 300, gen)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(kdfast.topk_scores(q, keys, 20, exclude=excl, backend="numba"))
    finally:
        torch.set_num_threads(old)
    for v, i in outs[1:]:
        assert torch.equal(v, outs[0][0]) and torch.equal(i, outs[0][1])


# ------------------------------------------------------------------------------- Plackett-Luce
def _pl_rows(dtype, gen, scale=3.0):
    s = (scale * torch.randn(8, 6, generator=gen, dtype=torch.float64)).to(dtype)
    u = (scale * torch.randn(8, 5, generator=gen, dtype=torch.float64)).to(dtype)
    t = torch.randn(8, generator=gen, dtype=torch.float64).to(dtype)
    s[0, 2] = s[0, 4] = float("-inf")  # padding inside a row
    s[1] = float("-inf")  # nothing valid: loss 0, gradient 0
    u[2] = float("-inf")  # no unranked entry
    s[3, 1] = float("nan")  # NaN propagates
    u[4, 0] = float("inf")  # +inf rest: loss +inf
    s[5, 3] = float("inf")  # +inf ranked: NaN
    t[6] = float("nan")
    u[7, 1] = float("nan")
    return s, u, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pl_non_finite_rules_match_reference_and_cpp(dtype):
    gen = torch.Generator().manual_seed(1)
    s, u, t = _pl_rows(dtype, gen)
    want = pl_ref.plackett_luce_loss(s.double(), u.double(), t.double(), "none")
    names = ["numba"] + (["cpp"] if _backend.ext() is not None else [])
    for name in names:
        got = kdfast.plackett_luce_loss(s, u, log_tail=t, reduction="none", backend=name)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert got[1] == 0 and torch.isnan(got[[3, 5, 6, 7]]).all() and got[4] == float("inf")


@pytest.mark.parametrize("scale", [1.0, 3e3])
def test_pl_gradients_match_reference_at_any_scale(scale):
    """Scores of +-1e4 take the log-space scans; small ones the one-shift way: both exact."""
    gen = torch.Generator().manual_seed(2)
    s = (scale * torch.randn(6, 9, generator=gen)).requires_grad_()
    u = (scale * torch.randn(6, 4, generator=gen)).requires_grad_()
    s.data[0, 3] = float("-inf")
    g = torch.rand(6, generator=gen) + 0.5
    loss = kdfast.plackett_luce_loss(s, u, reduction="none", backend="numba")
    got = (loss, *torch.autograd.grad((loss * g).sum(), [s, u]))
    s64, u64 = (x.detach().double().requires_grad_() for x in (s, u))
    loss = pl_ref.plackett_luce_loss(s64, u64, None, "none")  # the float64 oracle
    want = (loss, *torch.autograd.grad((loss * g.double()).sum(), [s64, u64]))
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-4)


def test_pl_embeddings_rows_repeats_and_empty_lists():
    """rows= with repeated rows, padding ids, an unranked-only row (K = 0 ranked columns), and the
    same bits for 1 and 2 threads."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(5, 7, generator=gen, requires_grad=True)
    e = torch.randn(11, 7, generator=gen, requires_grad=True)
    ri = torch.randint(-1, 11, (5, 4), generator=gen)
    ui = torch.randint(-1, 11, (5, 6), generator=gen)
    ri[2] = -1
    rows = torch.tensor([3, 0, 3, 2, 4])
    t = torch.randn(5, generator=gen, requires_grad=True)

    def run(name, threads=None):
        old = torch.get_num_threads()
        torch.set_num_threads(threads or old)
        try:
            loss = kdfast.plackett_luce_loss_from_embeddings(
                q, e, ri, ui, log_tail=t, rows=rows, reduction="none", backend=name
            )
            return (loss, *torch.autograd.grad(loss.sum() * 1.5, [q, e, t]))
        finally:
            torch.set_num_threads(old)

    want = run("torch")
    one, two = run("numba", 1), run("numba", 2)
    for x, y, z in zip(one, two, want):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-5)
    loss = kdfast.plackett_luce_loss_from_embeddings(
        q, e, ri[:, :0], ui, reduction="none", backend="numba"
    )
    assert torch.equal(loss, torch.zeros(5))
    empty = torch.zeros(0, 7)
    pad = torch.full((5, 3), -1)
    assert kdfast.plackett_luce_loss_from_embeddings(q, empty, pad, backend="numba") == 0


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change,name",
    [
        (dict(ranked_idx=torch.tensor([[0, 11]])), "ranked_idx holds ids outside"),
        (dict(unranked_idx=torch.tensor([[-2, 0]])), "unranked_idx holds ids outside"),
        (dict(rows=torch.tensor([0, 1])), "rows holds ids outside"),
    ],
)
def test_bad_ids_name_the_argument(change, name):
    args = dict(
        query_emb=torch.randn(1, 3),
        item_emb=torch.randn(11, 3),
        ranked_idx=torch.tensor([[0, 1]]),
        unranked_idx=torch.tensor([[2, -1]]),
    )
    args.update(change)
    with pytest.raises(ValueError, match=name):
        kdfast.plackett_luce_loss_from_embeddings(backend="numba", **args)


def test_the_process_survives_bad_input_and_concurrent_calls(tmp_path):
    """In a child process (a crash would end it, not the test session): bad input raises, and
    calls from several Python threads at once (numba's workqueue layer would end the process on a
    concurrent launch) all return the single-threaded result."""
    script = textwrap.dedent(
        """
        import threading, torch, kdfast
        try:
            kdfast.plackett_luce_loss_from_embeddings(
                torch.randn(2, 3), torch.randn(4, 3), torch.tensor([[0, 9], [1, 2]]),
                backend="numba")
        except ValueError as exc:
            assert "ranked_idx" in str(exc)
        q, k = torch.randn(64, 8), torch.randn(2000, 8)
        want = kdfast.topk_scores(q, k, 10, backend="numba")
        out = []
        def work():
            for _ in range(20):
                out.append(kdfast.topk_scores(q, k, 10, backend="numba"))
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(out) == 80 and all(torch.equal(i, want[1]) for _, i in out)
        print("ok")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_kdfast_imports_without_numba():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["numba"] = None  # import numba raises ImportError
        import torch, kdfast
        ok, why = kdfast.backends()["numba"]
        assert not ok and "pip install 'kdfast[numba]'" in why, why
        v, i = kdfast.topk_scores(torch.randn(2, 3), torch.randn(5, 3), 2)
        try:
            kdfast.topk_scores(torch.randn(2, 3), torch.randn(5, 3), 2, backend="numba")
        except RuntimeError as exc:
            assert "backend='numba' is not available" in str(exc)
        print("ok")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
