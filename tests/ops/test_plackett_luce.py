"""kdfast.plackett_luce_loss: every backend against the reference (values and gradients), padding,
extreme scores, gradcheck, torch.compile tracing, properties and bad inputs."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.ops.plackett_luce.reference import plackett_luce_loss as ref_loss
from tests.conftest import backend_params

NEG = float("-inf")
FAST = backend_params("cpp", "triton")
ALL = backend_params("torch", "cpp", "triton")

# inf - inf in masked lanes (interpreter)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make(B, K, L, *, tail=True, dtype=torch.float64, seed=0, scale=3.0, device="cpu"):
    """Random scores with ragged -inf padding: ranked lists of random length (row 0 fully padded
    when B > 2), unranked entries padded at random positions."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, K, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(0, K + 1, (B,), generator=g)
    if B > 2:
        lengths[0] = 0
        lengths[1] = K
    s[torch.arange(K)[None, :] >= lengths[:, None]] = NEG
    u = None
    if L is not None:
        u = torch.randn(B, L, generator=g, dtype=torch.float64) * scale
        u[torch.rand(B, L, generator=g) < 0.3] = NEG
    t = torch.randn(B, generator=g, dtype=torch.float64) * scale if tail else None
    cast = lambda x: None if x is None else x.to(dtype).to(device)
    return cast(s), cast(u), cast(t)


def run(fn, s, u, t, reduction, go):
    """Loss and gradients of (loss * go).sum() for fresh leaf copies of s, u, t."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (s, u, t)]
    loss = fn(leaves[0], leaves[1], leaves[2], reduction)
    (loss * go).sum().backward()
    # an input that takes no part (an unranked list of L = 0) may get an empty gradient or none
    return loss.detach(), [None if x is None or x.numel() == 0 else x.grad for x in leaves]


def kd(backend):
    return lambda s, u, t, r: kdfast.plackett_luce_loss(
        s, u, log_tail=t, reduction=r, backend=backend
    )


def ref64(s, u, t, r):
    return ref_loss(
        s.double(), None if u is None else u.double(), None if t is None else t.double(), r
    )


def assert_close(out, ref, rtol, atol):
    assert out is not None and ref is not None
    torch.testing.assert_close(
        out.double().cpu(), ref.double().cpu(), rtol=rtol, atol=atol, equal_nan=False
    )


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 7, 11), (1, 1, None), (3, 4, 1), (4, 6, None)])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_reference(backend, device_for, dtype, shape, tail, reduction):
    B, K, L = shape
    dev = device_for(backend)
    s, u, t = make(B, K, L, tail=tail, dtype=dtype, seed=B * 100 + K, device=dev)
    go = (
        torch.linspace(0.5, 2.0, B, dtype=torch.float64, device=dev) if reduction == "none" else 0.7
    )
    loss, grads = run(kd(backend), s, u, t, reduction, go)
    loss_r, grads_r = run(ref64, s, u, t, reduction, go)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert loss.dtype == dtype
    assert_close(loss, loss_r, **tol)
    for g, gr, x in zip(grads, grads_r, (s, u, t)):
        if x is not None:
            assert g.dtype == x.dtype and g.shape == x.shape
            assert_close(g, gr, **tol)


@pytest.mark.parametrize("backend", ALL)
def test_padding_width_does_not_matter(backend, device_for):
    """The same valid entries padded to several widths give the same loss and gradients."""
    dev = device_for(backend)
    s, u, t = make(4, 5, 6, dtype=torch.float32, seed=3, device=dev)
    base, base_g = run(kd(backend), s, u, t, "none", 1.3)
    for extra in (1, 3, 8):
        sp = torch.cat([s, torch.full((4, extra), NEG, device=dev)], 1)
        up = torch.cat([torch.full((4, extra + 1), NEG, device=dev), u], 1)
        loss, grads = run(kd(backend), sp, up, t, "none", 1.3)
        torch.testing.assert_close(loss, base, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[0][:, :5], base_g[0], rtol=1e-6, atol=1e-6)
        assert (grads[0][:, 5:] == 0).all() and (grads[1][:, : extra + 1] == 0).all()
        torch.testing.assert_close(grads[1][:, extra + 1 :], base_g[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_all_padded_rows_give_zero(backend, device_for):
    dev = device_for(backend)
    s = torch.full((3, 4), NEG, device=dev)
    s[1, :2] = torch.tensor([1.0, -2.0])
    u = torch.randn(3, 5, device=dev)
    u[2] = NEG
    t = torch.randn(3, device=dev)
    loss, grads = run(kd(backend), s, u, t, "none", 2.0)
    assert loss[0] == 0 and loss[2] == 0 and loss[1] > 0
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[0][[0, 2]] == 0).all() and (grads[1][[0, 2]] == 0).all() and grads[2][0] == 0


@pytest.mark.parametrize("backend", ALL)
def test_huge_scores_are_exact_in_float32(backend, device_for):
    """Scores of +-1e4 (the authors' raw-exp form overflows above ~88): finite, and equal to the
    float64 reference to float32 rounding of the inputs."""
    dev = device_for(backend)
    s, u, t = make(4, 9, 13, dtype=torch.float32, seed=5, scale=1.0, device=dev)
    s, u, t = (
        torch.where(torch.isinf(x), x, torch.sign(x) * 1e4 * x.abs().clamp(0.01, 1))
        for x in (s, u, t)
    )
    loss, grads = run(kd(backend), s, u, t, "none", 1.0)
    loss_r, grads_r = run(ref64, s, u, t, "none", 1.0)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    # inputs of 1e4 carry an absolute rounding error of ~1e-3 in float32
    assert_close(loss, loss_r, rtol=1e-6, atol=2e-2)
    for g, gr in zip(grads, grads_r):
        assert_close(g, gr, rtol=0, atol=5e-3)


@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_nan_propagates(backend):
    s, u, t = make(3, 4, 5, dtype=torch.float32, seed=7)
    s[1, 1] = 0.5
    s[1, 1] = float("nan")
    loss = kdfast.plackett_luce_loss(s, u, log_tail=t, reduction="none", backend=backend)
    ref = ref_loss(s, u, t, "none")
    assert torch.isnan(loss[1]) and torch.isnan(ref[1])
    assert torch.isfinite(loss[[0, 2]]).all()


def test_k_zero_with_unranked_is_zero():
    s = torch.zeros(3, 0)
    u = torch.randn(3, 4)
    for backend in ("torch", "cpp") if kdfast.backends()["cpp"][0] else ("torch",):
        assert kdfast.plackett_luce_loss(s, u, backend=backend).item() == 0


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 6),
    K=st.integers(1, 9),
    L=st.one_of(st.none(), st.integers(0, 12)),
    tail=st.booleans(),
    scale=st.sampled_from([0.1, 3.0, 50.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_property_cpp_matches_reference(B, K, L, tail, scale, seed):
    backend = "cpp" if kdfast.backends()["cpp"][0] else "torch"
    s, u, t = make(B, K, L, tail=tail, seed=seed, scale=scale)
    loss, grads = run(kd(backend), s, u, t, "none", 1.0)
    loss_r, grads_r = run(ref64, s, u, t, "none", 1.0)
    assert_close(loss, loss_r, rtol=1e-9, atol=1e-9 * scale)
    for g, gr in zip(grads, grads_r):
        if g is not None:
            assert_close(g, gr, rtol=1e-8, atol=1e-8)
    # properties: every valid term log D_k - s_k >= 0, ranked gradients sum to <= 0 per row when
    # there is extra mass, and the loss is invariant to adding a constant to every score and the
    # tail.
    assert (loss >= -1e-9).all()
    shifted, _ = run(
        kd(backend),
        s + 7.0,
        None if u is None else u + 7.0,
        None if t is None else t + 7.0,
        "none",
        1.0,
    )
    assert_close(shifted, loss, rtol=1e-9, atol=1e-9 * max(scale, 10))


def test_rrd_call_convention():
    """The form RRD uses: positional ranked/unranked, keyword log_tail, sum reduction; equals the
    closed-form loss on a hand-computed row."""
    s = torch.tensor([[2.0, 1.0, NEG]])
    u = torch.tensor([[0.0, NEG]])
    t = torch.tensor([math.log(3.0)])
    d1 = math.exp(2) + math.exp(1) + 1 + 3
    d2 = math.exp(1) + 1 + 3
    expected = (math.log(d1) - 2) + (math.log(d2) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = kdfast.plackett_luce_loss(s, u, log_tail=t, reduction="sum")
    assert abs(out.item() - expected) < 1e-5


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs_float32_math(backend, device_for, dtype, grad_tol):
    """float16/bfloat16 scores: the loss is float32 (float32 math), the gradients come back in the
    input dtype; relative RMS error against the float64 reference of the same (rounded) inputs."""
    s, u, t = make(4, 6, 9, dtype=dtype, seed=21, device=device_for(backend))
    loss, grads = run(kd(backend), s, u, t.float(), "none", 1.5)
    loss_r, grads_r = run(ref64, s, u, t.float(), "none", 1.5)
    assert loss.dtype == torch.float32
    assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    for g, gr, x in zip(grads, grads_r, (s, u, t)):
        assert g.dtype == (x.dtype if x is not t else torch.float32)
        assert torch.isfinite(g).all()
        assert (g.double().cpu() - gr.cpu()).norm() <= grad_tol * gr.norm().cpu() + 1e-6
