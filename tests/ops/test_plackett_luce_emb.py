"""kdfast.plackett_luce_loss_from_embeddings: every backend against gather + reference loss (values
and gradients for query, item table and log_tail, with repeated ids and -1 padding), gradcheck,
tracing, determinism and bad inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.ops.plackett_luce.reference import plackett_luce_loss_from_embeddings as ref_emb
from tests.conftest import backend_params

FAST = backend_params("cpp", "triton")
# inf - inf in masked lanes (interpreter)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make(B, d, N, K, L, *, tail=True, dtype=torch.float64, seed=0, device="cpu"):
    """Embeddings and id lists with repeated ids (N small), ragged -1 padding (row 0 fully
    padded)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g, dtype=torch.float64)
    e = torch.randn(N, d, generator=g, dtype=torch.float64)
    ri = torch.randint(0, N, (B, K), generator=g)
    lengths = torch.randint(0, K + 1, (B,), generator=g)
    if B > 1:
        lengths[0] = 0
    ri[torch.arange(K)[None, :] >= lengths[:, None]] = -1
    ui = None
    if L is not None:
        ui = torch.randint(0, N, (B, L), generator=g)
        ui[torch.rand(B, L, generator=g) < 0.3] = -1
    t = torch.randn(B, generator=g, dtype=torch.float64) if tail else None
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)
    move = lambda x: None if x is None else x.to(device)
    return cast(q), cast(e), move(ri), move(ui), cast(t)


def run(fn, q, e, ri, ui, t, reduction, go):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (q, e, t)]
    loss = fn(leaves[0], leaves[1], ri, ui, leaves[2], reduction)
    (loss * go).sum().backward()
    return loss.detach(), [None if x is None else x.grad for x in leaves]


def kd(backend):
    return lambda q, e, ri, ui, t, r: kdfast.plackett_luce_loss_from_embeddings(
        q, e, ri, ui, log_tail=t, reduction=r, backend=backend
    )


def ref64(q, e, ri, ui, t, r):
    return ref_emb(q.double(), e.double(), ri, ui, None if t is None else t.double(), r)


def close(a, b, rtol, atol):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(5, 6, 7, 4, 9), (1, 3, 2, 1, None), (3, 17, 5, 6, 1), (4, 8, 3, 5, 40)]
)
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_matches_gather_then_reference(backend, device_for, dtype, shape, tail, reduction):
    B, d, N, K, L = shape
    dev = device_for(backend)
    q, e, ri, ui, t = make(B, d, N, K, L, tail=tail, dtype=dtype, seed=B + d + N, device=dev)
    go = (
        torch.linspace(0.5, 2.0, B, dtype=torch.float64, device=dev) if reduction == "none" else 0.7
    )
    loss, grads = run(kd(backend), q, e, ri, ui, t, reduction, go)
    loss_r, grads_r = run(ref64, q, e, ri, ui, t, reduction, go)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    close(loss, loss_r, **tol)
    for g, gr, x in zip(grads, grads_r, (q, e, t)):
        if x is not None:
            assert g.dtype == x.dtype and g.shape == x.shape
            close(g, gr, **tol)


@pytest.mark.parametrize("backend", FAST)
def test_all_repeated_ids_accumulate(backend, device_for):
    """Every entry of every row points at the same item: its gradient row is the sum of them all."""
    dev = device_for(backend)
    q, e, _, _, t = make(3, 4, 5, 2, 3, dtype=torch.float32, seed=9, device=dev)
    ri = torch.full((3, 4), 2, device=dev)
    ui = torch.full((3, 6), 2, device=dev)
    ui[:, 0] = 4
    loss, grads = run(kd(backend), q, e, ri, ui, t, "sum", 1.0)
    loss_r, grads_r = run(ref64, q, e, ri, ui, t, "sum", 1.0)
    close(loss, loss_r, 1e-5, 1e-5)
    for g, gr in zip(grads, grads_r):
        close(g, gr, 1e-5, 1e-5)
    assert (grads[1][[0, 1, 3]] == 0).all()


@pytest.mark.parametrize("backend", FAST)
def test_no_grad_forward_matches(backend, device_for):
    dev = device_for(backend)
    q, e, ri, ui, t = make(4, 5, 6, 3, 7, dtype=torch.float32, seed=10, device=dev)
    with torch.no_grad():
        a = kdfast.plackett_luce_loss_from_embeddings(
            q, e, ri, ui, log_tail=t, reduction="none", backend=backend
        )
    b = ref64(q, e, ri, ui, t, "none")
    close(a, b, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp", "triton"))
@pytest.mark.parametrize("tail", [True, False])
def test_rows_equal_gathering_first(backend, device_for, tail):
    """rows=r is query_emb[r], ranked_idx[r], unranked_idx[r], log_tail[r] (repeats included), with
    gradients reaching the full tables."""
    dev = device_for(backend)
    q, e, ri, ui, t = make(6, 5, 7, 4, 6, tail=tail, dtype=torch.float32, seed=31, device=dev)
    rows = torch.tensor([4, 0, 4, 2, 5], device=dev)
    go = torch.linspace(0.5, 2.0, rows.numel(), dtype=torch.float64, device=dev)

    def with_rows(q_, e_, ri_, ui_, t_, r):
        return kdfast.plackett_luce_loss_from_embeddings(
            q_, e_, ri_, ui_, log_tail=t_, rows=rows, reduction=r, backend=backend
        )

    def gathered(q_, e_, ri_, ui_, t_, r):
        return ref64(q_[rows], e_, ri_[rows], ui_[rows], None if t_ is None else t_[rows], r)

    loss, grads = run(with_rows, q, e, ri, ui, t, "none", go)
    loss_r, grads_r = run(gathered, q, e, ri, ui, t, "none", go)
    close(loss, loss_r, 2e-5, 2e-5)
    for g, gr, x in zip(grads, grads_r, (q, e, t)):
        if x is not None:
            assert g.shape == x.shape
            close(g, gr, 2e-5, 2e-5)
    assert (grads[0][[1, 3]] == 0).all()  # rows 1 and 3 are not used


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
def test_rows_bad_input(backend):
    q, e, ri, ui, t = make(3, 4, 5, 3, 4, dtype=torch.float32)

    def f(rows):
        return kdfast.plackett_luce_loss_from_embeddings(q, e, ri, ui, rows=rows, backend=backend)

    with pytest.raises(ValueError, match="rows"):
        f(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="rows"):
        f(torch.tensor([-1]))
    with pytest.raises(TypeError, match="rows"):
        f(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="rows"):
        f(torch.tensor([[0]]))


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_cpp_same_bits_for_any_thread_count(backend):
    """The item gradient sums every item row in (row, position) order whatever the thread count."""
    q, e, ri, ui, t = make(200, 20, 50, 12, 30, dtype=torch.float32, seed=32)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 200, (400,), generator=g)
    # some rows get no gradient
    go = torch.rand(400, generator=g) * (torch.rand(400, generator=g) > 0.2)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (
            1,
            2,
            3,
            4,
            5,
        ):  # 2-3 threads split the item range, 4+ bucket the entries by owner thread first
            torch.set_num_threads(n)
            out.append(
                run(
                    lambda q_, e_, ri_, ui_, t_, r: kdfast.plackett_luce_loss_from_embeddings(
                        q_, e_, ri_, ui_, log_tail=t_, rows=rows, reduction=r, backend=backend
                    ),
                    q,
                    e,
                    ri,
                    ui,
                    t,
                    "none",
                    go,
                )
            )
    finally:
        torch.set_num_threads(before)
    for other in out[1:]:
        assert torch.equal(out[0][0], other[0])
        assert all(torch.equal(x, y) for x, y in zip(out[0][1], other[1]))
    ref = run(
        lambda q_, e_, ri_, ui_, t_, r: ref64(q_[rows], e_, ri[rows], ui[rows], t_[rows], r),
        q.double(),
        e.double(),
        ri,
        ui,
        t.double(),
        "none",
        go.double(),
    )
    torch.testing.assert_close(out[0][0].double(), ref[0], rtol=1e-4, atol=1e-4)
    for x, y in zip(out[0][1], ref[1]):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 5),
    d=st.integers(1, 9),
    N=st.integers(1, 8),
    K=st.integers(1, 6),
    L=st.one_of(st.none(), st.integers(0, 10)),
    tail=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_cpp_matches_reference(B, d, N, K, L, tail, seed):
    backend = "cpp" if kdfast.backends()["cpp"][0] else "torch"
    q, e, ri, ui, t = make(B, d, N, K, L, tail=tail, seed=seed)
    loss, grads = run(kd(backend), q, e, ri, ui, t, "none", 1.0)
    loss_r, grads_r = run(ref64, q, e, ri, ui, t, "none", 1.0)
    close(loss, loss_r, 1e-9, 1e-9)
    for g, gr in zip(grads, grads_r):
        if g is not None:
            close(g, gr, 1e-8, 1e-8)


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_embeddings_float32_math(backend, device_for, dtype, grad_tol):
    q, e, ri, ui, t = make(4, 8, 6, 3, 7, dtype=dtype, seed=22, device=device_for(backend))
    loss, grads = run(kd(backend), q, e, ri, ui, t.float(), "none", 1.5)
    loss_r, grads_r = run(ref64, q, e, ri, ui, t.float(), "none", 1.5)
    assert loss.dtype == torch.float32
    close(loss, loss_r, 1e-4, 1e-4)
    for g, gr, _x in zip(grads[:2], grads_r[:2], (q, e)):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert (g.double().cpu() - gr.cpu()).norm() <= grad_tol * gr.norm().cpu() + 1e-6


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_deterministic_mode(backend, device_for):
    """Under torch.use_deterministic_algorithms the item gradient is summed without atomics: equal
    to the reference, and bitwise equal run to run."""
    dev = device_for(backend)
    q, e, ri, ui, t = make(5, 6, 4, 3, 8, dtype=torch.float32, seed=23, device=dev)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = run(kd(backend), q, e, ri, ui, t, "sum", 0.8)
        b = run(kd(backend), q, e, ri, ui, t, "sum", 0.8)
    finally:
        torch.use_deterministic_algorithms(before)
    ref = run(ref64, q, e, ri, ui, t, "sum", 0.8)
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    for g, gr in zip(a[1], ref[1]):
        close(g, gr, 2e-5, 2e-5)
