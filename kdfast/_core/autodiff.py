"""The autograd machinery every differentiable op registers through, and the gradients of the
references.

An op's forward is a torch.library custom op (with a fake implementation), so torch.compile with
fullgraph=True traces through it. `differentiable` registers its autograd formula and returns the
function the op calls: the custom op while torch.compile traces, and otherwise a plain
torch.autograd.Function running the same implementation, context setup and gradient without the
dispatcher (whose per-call cost, about 0.05 ms per forward and more per backward on the CPU, was a
tenth of an RRD training step).

Every backend returns, with the forward, the gradients the backward needs "at unit upstream
gradient" (or what it needs to compute them); the backward formula is then linear in the incoming
gradient and the same for every backend. It is first-order only: a second derivative through a
kdfast op raises a clear error (instead of silently treating the saved gradients as constants).

`value_and_grads` derives those unit-upstream gradients from a reference function with
torch.func.vjp, so the "torch" backend of an op is its reference itself, not a second, hand-written
gradient.
"""

from __future__ import annotations

import contextlib

import torch

NO_DOUBLE_BACKWARD = (
    "{name} does not support double backward (a gradient of its gradient, e.g. "
    "torch.autograd.grad(..., create_graph=True)); compute that term with the op's reference "
    "(kdfast.ops.{module}.reference) instead"
)


def first_order(name: str, module: str, backward):
    """backward(ctx, *grads), refusing to run where autograd would record it for a second
    derivative."""

    def checked(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(NO_DOUBLE_BACKWARD.format(name=name, module=module))
        return backward(ctx, *grads)

    return checked


def differentiable(
    op, impl, *, setup, backward, name: str, module: str, bwd_op=None, bwd_impl=None
):
    """Registers the autograd formula of the custom op `op` (implemented by `impl`) and returns
    call(*args).

    setup(ctx, inputs, output): saves what the backward needs. backward(ctx, *grads, bwd): the input
    gradients; `bwd` is the op's backward custom op `bwd_op` under torch.compile and its plain
    implementation `bwd_impl` otherwise (None when the backward needs no kernel of its own). Output
    0 is the differentiable result; the other outputs are saved auxiliaries without gradient.
    """

    def compiled_backward(ctx, *grads):
        return backward(ctx, *grads, bwd=bwd_op)

    def eager_backward(ctx, *grads):
        return backward(ctx, *grads, bwd=bwd_impl)

    op.register_autograd(first_order(name, module, compiled_backward), setup_context=setup)

    def forward(ctx, *inputs):  # not a setup_context method: apply() would inspect it on every call
        output = impl(*inputs)
        setup(ctx, inputs, output)
        if isinstance(output, tuple):
            ctx.mark_non_differentiable(*output[1:])
        return output

    eager = type(
        f"{name}_eager",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(first_order(name, module, eager_backward)),
        },
    )

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else eager.apply(*args)

    return call


def check_kept(ctx, kept: dict, name: str) -> None:
    """RuntimeError when autograd wants the gradient of input i (ctx.needs_input_grad) but the
    forward was told not to keep it (kept[i] False): a direct call of the custom op with the wrong
    flag, which would otherwise give a silently missing gradient or read an empty buffer."""
    for i, was_kept in kept.items():
        if ctx.needs_input_grad[i] and not was_kept:
            raise RuntimeError(
                f"{name}: input {i} needs a gradient, but the forward ran with the flag that "
                "skips it (call the public function, or pass the gradient flags the inputs need)"
            )


def scaled(grad: torch.Tensor, unit: torch.Tensor, dtype: torch.dtype | None):
    """The upstream `grad` ([B] or a scalar) times a gradient `unit` taken at unit upstream gradient
    ([B, ...] or any shape for a scalar grad), in `dtype`; None for an input without one (dtype
    None)."""
    if dtype is None:
        return None
    g = grad.to(unit.dtype)
    return (g.reshape(g.shape + (1,) * (unit.dim() - g.dim())) * unit).to(dtype)


def requires_grad(*tensors) -> bool:
    """Whether autograd will want a gradient of any of the tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_FUNCTORCH_KEYS = tuple(
    getattr(torch._C.DispatchKey, name)
    for name in (
        "FuncTorchDynamicLayerFrontMode",
        "FuncTorchDynamicLayerBackMode",
        "FuncTorchGradWrapper",
        "FuncTorchBatched",
        "FuncTorchVmapMode",
    )
    if hasattr(torch._C.DispatchKey, name)
)


def _functorch_enabled():
    """A context in which torch.func works inside a custom op's implementation.

    A compiled graph's first call runs its custom ops under a dispatch mode (PyTorch's aliasing
    check), whose handler excludes the dispatch keys above Python, torch.func's among them, from the
    thread's key set; torch.func then fails ("Cannot access data pointer of Tensor that doesn't have
    storage"). Only in that case this context takes them out of the excluded set again for its
    duration (a private PyTorch guard, the one its own higher-order ops use; without it, nothing
    changes).
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    if not _FUNCTORCH_KEYS or not excluded.has(_FUNCTORCH_KEYS[0]):
        return contextlib.nullcontext()
    for key in _FUNCTORCH_KEYS:
        excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def _partial(fn, inputs, wanted):
    """(the indices i with wanted[i] and inputs[i] given, fn as a function of those inputs
    alone)."""
    pick = [i for i, (x, w) in enumerate(zip(inputs, wanted)) if w and x is not None]

    def partial(*chosen):
        args = list(inputs)
        for i, x in zip(pick, chosen):
            args[i] = x
        return fn(*args)

    return pick, partial


def _spread(pick, got, n, fill):
    """The n gradients: got[j] at position pick[j], fill() (a fresh placeholder: outputs of a custom
    op must not alias each other) elsewhere."""
    grads = [fill() for _ in range(n)]
    for i, g in zip(pick, got):
        grads[i] = g
    return grads


def value_and_grads(fn, inputs, wanted, *, has_aux=False):
    """(value, grads) of value = fn(*inputs): grads[i] = d value.sum() / d inputs[i] for every i
    with wanted[i] and inputs[i] not None, else an empty tensor. Computed with torch.func.vjp, so it
    also runs inside a custom op (where autograd does not record). For a per-row loss whose row b
    depends only on row b of an input, grads[i] holds each row's gradient at unit upstream gradient.
    has_aux: fn returns (value, aux) and the result is (value, aux, grads)."""
    pick, partial = _partial(fn, inputs, wanted)
    first = next(x for x in inputs if x is not None)

    def placeholder():
        return first.new_empty(0)

    if not pick:
        with torch.no_grad():
            out = fn(*inputs)
        grads = _spread(pick, (), len(inputs), placeholder)
        return (*out, grads) if has_aux else (out, grads)
    with _functorch_enabled():
        value, pullback, *aux = torch.func.vjp(partial, *(inputs[i] for i in pick), has_aux=has_aux)
        grads = _spread(pick, pullback(torch.ones_like(value)), len(inputs), placeholder)
    return (value, aux[0], grads) if has_aux else (value, grads)


def vjp(fn, inputs, grad, wanted):
    """The gradients of fn(*inputs) against the upstream `grad`, for the inputs with wanted[i] (None
    for the others): the backward of a reference function, by torch.func.vjp."""
    pick, partial = _partial(fn, inputs, wanted)
    with _functorch_enabled():
        value, pullback = torch.func.vjp(partial, *(inputs[i] for i in pick))
        return _spread(
            pick, pullback(grad.to(value.dtype).reshape(value.shape)), len(inputs), lambda: None
        )
