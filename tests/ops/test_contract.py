"""The op contract, clause by clause, for every public op (tests/ops/contract.py) on every backend:
reference match (values and gradients, upstream gradient != 1), float64 gradcheck, opcheck of the
custom ops, torch.compile(fullgraph=True), determinism, inputs left untouched, bad input rejected,
and a second derivative refused. The op-specific tests (test_<op>.py) cover what is particular to
one op."""

import pytest
import torch

from tests.conftest import backend_params, device_of
from tests.ops.contract import SPECS

BACKENDS = backend_params("torch", "cpp", "triton", "numba")
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def _spec_params():
    return [pytest.param(s, id=s.name) for s in SPECS]


def _dtypes(spec, backend):
    return spec.dtypes.get(backend, ())


@pytest.fixture(autouse=True)
def _skip_missing_backend(request):
    """A backend the op lacks (no dtypes in its Spec) has no contract to keep."""
    params = getattr(request.node, "callspec", None)
    params = params.params if params else {}
    spec, backend = params.get("spec"), params.get("backend")
    if spec is not None and backend is not None and not _dtypes(spec, backend):
        pytest.skip(f"{spec.name} has no {backend} backend")


def _inputs(spec, backend, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    args, kwargs = spec.make(dtype, device_of(backend), gen)
    args = tuple(a.detach().requires_grad_() if i in spec.diff else a for i, a in enumerate(args))
    return args, kwargs


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _run(spec, args, kwargs, backend, upstream_seed=7):
    """Output and the gradients of <output, g> for a fixed non-unit upstream g."""
    out = spec.call(args, kwargs, backend)
    if not spec.diff:
        return out, []
    loss = _first(out)
    g = torch.rand(
        loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64
    )
    g = (g + 0.5).to(loss.dtype).to(loss.device)
    grads = torch.autograd.grad((loss * g).sum(), [args[i] for i in spec.diff])
    return out, list(grads)


def _oracle_grads(spec, args, kwargs, upstream_seed=7):
    leaves = tuple(
        a.detach().double().requires_grad_() if i in spec.diff else a for i, a in enumerate(args)
    )
    out = spec.oracle(leaves, kwargs)
    if not spec.diff:
        return out, []
    g = (
        torch.rand(
            out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64
        )
        + 0.5
    )
    return out, list(
        torch.autograd.grad((out * g.to(out.device)).sum(), [leaves[i] for i in spec.diff])
    )


def _close(got, want, dtype):
    torch.testing.assert_close(
        got.detach().double().cpu(), want.detach().double().cpu(), **TOL[dtype]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", _spec_params())
def test_matches_reference(spec, backend):
    for dtype in _dtypes(spec, backend):
        args, kwargs = _inputs(spec, backend, dtype)
        out, grads = _run(spec, args, kwargs, backend)
        want, want_grads = _oracle_grads(spec, args, kwargs)
        if isinstance(out, tuple):  # top-K: exact order on exact scores
            assert torch.equal(out[1].cpu(), want[1].cpu())
            _close(out[0], want[0], dtype)
        else:
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            _close(out, want, dtype)
        for g, w, i in zip(grads, want_grads, spec.diff):
            assert g.dtype == args[i].dtype and g.shape == args[i].shape
            _close(g, w, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", _spec_params())
def test_gradcheck_float64(spec, backend):
    if not spec.diff or backend not in spec.gradcheck:
        pytest.skip("not differentiable, or this backend computes in float32 whatever the input")
    args, kwargs = _inputs(spec, backend, torch.float64)

    def f(*diff):
        full = list(args)
        for i, x in zip(spec.diff, diff):
            full[i] = x
        return _first(spec.call(tuple(full), kwargs, backend))

    # Triton: fast mode (a random projection of the Jacobian): the interpreter makes full
    # Jacobians slow
    assert torch.autograd.gradcheck(
        f,
        [args[i] for i in spec.diff],
        eps=1e-6,
        atol=1e-5,
        rtol=1e-4,
        fast_mode=backend == "triton",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", _spec_params())
def test_opcheck(spec, backend):
    args, kwargs = _inputs(spec, backend, torch.float32)
    for op, op_args in spec.ops(args, kwargs, backend):
        torch.library.opcheck(op, op_args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", _spec_params())
def test_compile_fullgraph(spec, backend):
    torch._dynamo.reset()
    args, kwargs = _inputs(spec, backend, torch.float32)
    compiled = torch.compile(
        lambda *a: spec.call(a, kwargs, backend), fullgraph=True, backend="aot_eager"
    )
    out, grads = _run(spec, args, kwargs, backend)
    c_spec = type(spec)(**{**spec.__dict__, "call": lambda a, kw, b: compiled(*a)})
    c_out, c_grads = _run(c_spec, args, kwargs, backend)
    for x, y in zip(_outputs(out), _outputs(c_out)):
        torch.testing.assert_close(x, y)
    for x, y in zip(grads, c_grads):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", _spec_params())
def test_deterministic_and_inputs_untouched(spec, backend):
    args, kwargs = _inputs(spec, backend, torch.float32)
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    excl = [x.clone() for x in kwargs.get("exclude", ())]
    # a backend that sums gradients with atomics is reproducible in deterministic mode only
    torch.use_deterministic_algorithms(backend in spec.atomic_grads)
    try:
        first, g1 = _run(spec, args, kwargs, backend)
        second, g2 = _run(spec, args, kwargs, backend)
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y in zip(_outputs(first), _outputs(second)):
        assert torch.equal(x, y)
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.detach(), b)
    for x, y in zip(kwargs.get("exclude", ()), excl):
        assert torch.equal(x, y)


def _bad_params():
    return [pytest.param(s, case, id=f"{s.name}-{case[0]}") for s in SPECS for case in s.bad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,case", _bad_params())
def test_bad_input_rejected(spec, case, backend):
    _, mutate, exc, fragment = case
    args, kwargs = _inputs(spec, backend, torch.float32)
    bad_args, bad_kwargs = mutate(args, kwargs)
    with pytest.raises(exc, match=fragment):
        spec.call(bad_args, bad_kwargs, backend)


@pytest.mark.parametrize("spec", _spec_params())
def test_unknown_backend_rejected(spec):
    args, kwargs = _inputs(spec, "torch", torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        spec.call(args, kwargs, "cuda")


@pytest.mark.parametrize("backend", backend_params("cpp"))
@pytest.mark.parametrize("spec", _spec_params())
def test_cpp_refuses_half_precision_and_auto_runs_it(spec, backend):
    """float16 is a GPU dtype: the cpp backend refuses it by name; "auto" runs it on torch."""
    args, kwargs = _inputs(spec, "cpp", torch.float32)

    def to(x, dtype):
        return x.detach().to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    half = tuple(to(a, torch.float16) for a in args)
    half_kw = {k: to(v, torch.float16) for k, v in kwargs.items()}
    with pytest.raises(TypeError, match="backend='cpp' takes float32 or float64"):
        spec.call(half, half_kw, "cpp")
    want = spec.call(
        tuple(to(a, torch.float32) for a in half),
        {k: to(v, torch.float32) for k, v in half_kw.items()},
        "torch",
    )
    got = spec.call(half, half_kw, "auto")
    for x, y in zip(_outputs(got), _outputs(want)):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", _spec_params())
def test_second_derivative_refused(spec, backend):
    """A gradient of a gradient (a gradient penalty) raises instead of silently treating the saved
    first-order gradients as constants."""
    if not spec.diff:
        pytest.skip("not differentiable")
    args, kwargs = _inputs(
        spec, backend, torch.float64 if torch.float64 in _dtypes(spec, backend) else torch.float32
    )
    loss = _first(spec.call(args, kwargs, backend)).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [args[i] for i in spec.diff], create_graph=True)
