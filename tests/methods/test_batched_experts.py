"""The batched expert evaluation (ExpertBank.forward over the concatenated experts, forward_selected
as one grouped, padded computation; DE and PHR's one evaluation per side) against the plain loops
they replace: values and gradients to 1e-6 in float32 and 1e-12 in float64, experts that receive no
rows and experts that receive a single row included."""

import pytest
import torch

import kdfast
from kdfast.methods.experts import ExpertBank, gumbel_softmax
from tests.methods._helpers import entity_setup

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def expert(bank, m, x):
    """E_m(x) written out for one expert."""
    return torch.relu(x @ bank.w1[m] + bank.b1[m]) @ bank.w2[m] + bank.b2[m]


def mixture_loop(bank, x, w):
    """sum_m w[:, m] E_m(x): one expert at a time."""
    return sum(w[:, m : m + 1] * expert(bank, m, x) for m in range(bank.w1.shape[0]))


def selected_loop(bank, x, idx, weight):
    """weight[b] E_{idx[b]}(x[b]): one row at a time."""
    rows = [weight[b] * expert(bank, int(idx[b]), x[b : b + 1])[0] for b in range(x.shape[0])]
    return torch.stack(rows) if rows else x.new_zeros((0, bank.w2.shape[2]))


def values_and_grads(fn, leaves):
    """(fn(), d <fn(), R> / d leaves) for a fixed random R (every output element matters)."""
    for t in leaves:
        t.grad = None
    out = fn()
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * r).sum().backward()
    return out.detach(), [t.grad.clone() for t in leaves]


def assert_same(a, b, dtype):
    tol = TOL[dtype]
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, rtol=tol, atol=tol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _bank(dtype, m=6, d_in=4, d_out=10):
    return ExpertBank(m, d_in, d_out, generator=torch.Generator().manual_seed(3)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixture_matches_loop_over_experts(dtype):
    bank = _bank(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=g, dtype=dtype).requires_grad_()
    w = torch.softmax(torch.randn(9, 6, generator=g, dtype=dtype), 1).requires_grad_()
    leaves = [x, w, *bank.parameters()]
    assert_same(
        values_and_grads(lambda: bank(x, w), leaves),
        values_and_grads(lambda: mixture_loop(bank, x, w), leaves),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_padding", [4.0, 0.0])  # 0: the per-expert fallback
def test_selected_matches_loop_with_empty_and_single_row_experts(dtype, max_padding):
    bank = _bank(dtype)
    bank.max_padding = max_padding
    g = torch.Generator().manual_seed(1)
    # expert 0: three rows, 1 and 4: none, 2: one row, 3: two rows, 5: one row
    idx = torch.tensor([3, 0, 2, 0, 5, 3, 0])
    x = torch.randn(7, 4, generator=g, dtype=dtype).requires_grad_()
    wt = torch.rand(7, generator=g, dtype=dtype).requires_grad_()
    leaves = [x, wt, *bank.parameters()]
    got = values_and_grads(lambda: bank.forward_selected(x, idx, wt), leaves)
    want = values_and_grads(lambda: selected_loop(bank, x, idx, wt), leaves)
    assert_same(got, want, dtype)
    assert torch.all(bank.w1.grad[[1, 4]] == 0) and torch.all(bank.b2.grad[[1, 4]] == 0)


@pytest.mark.parametrize("n", [0, 1])
def test_selected_with_no_row_or_one_row(n):
    bank = _bank(torch.float64)
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    wt = torch.rand(n, dtype=torch.float64, requires_grad=True)
    idx = torch.full((n,), 4)
    got = bank.forward_selected(x, idx, wt)
    assert got.shape == (n, 10)
    torch.testing.assert_close(got, selected_loop(bank, x, idx, wt), rtol=1e-12, atol=1e-12)


def test_selected_is_bitwise_reproducible():
    bank = _bank(torch.float32, m=30, d_in=20, d_out=200)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 20, generator=g, requires_grad=True)
    idx, wt = torch.randint(0, 30, (500,), generator=g), torch.rand(500, generator=g)
    runs = [values_and_grads(lambda: bank.forward_selected(x, idx, wt), [x, *bank.parameters()])]
    runs.append(
        values_and_grads(lambda: bank.forward_selected(x, idx, wt), [x, *bank.parameters()])
    )
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def de_loop(method, su, si, users, pos, neg):
    """DE's loss as three separate evaluations (users, unique pos, unique neg), each expert mixture
    by the loop over experts (or over rows, selected only), drawing the same Gumbel noise."""

    def loss_of(side, t, s, ids):
        h_t = t[ids].to(s.dtype)
        alpha = torch.softmax(method.selectors[side](h_t), dim=-1)
        z = gumbel_softmax(alpha, method.tau, method._noise)
        bank = method.experts[side]
        if method.selected_only():
            w, idx = z.max(dim=-1)
            hhat = selected_loop(bank, s[ids], idx, w)
        else:
            hhat = mixture_loop(bank, s[ids], z)
        return ((h_t - hhat) ** 2).sum()

    tu, ti = method.teacher_user, method.teacher_item
    return method.lambda_de * (
        loss_of("user", tu, su, users.unique())
        + 0.5 * (loss_of("item", ti, si, pos.unique()) + loss_of("item", ti, si, neg.unique()))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("select_only_below", [None, 1e-3])
def test_de_matches_per_call_loop(dtype, select_only_below):
    tu, ti, su, si, users, pos, neg = entity_setup(dtype=dtype, b=24)

    def build():
        m = kdfast.DE.build(
            tu,
            ti,
            None,
            4,
            generator=torch.Generator().manual_seed(7),
            n_experts=5,
            select_only_below=select_only_below,
        ).to(dtype)
        m.start_epoch(30, 100, su, si)  # tau 1e-3: soft mixture, or selected only below 1e-3
        if select_only_below is not None:
            m.start_epoch(60, 100, su, si)
        return m

    a, b = build(), build()
    got = values_and_grads(lambda: a(su, si, users, pos, neg), [su, si, *a.parameters()])
    want = values_and_grads(lambda: de_loop(b, su, si, users, pos, neg), [su, si, *b.parameters()])
    assert_same(got, want, dtype)


def phr_loop(method, su, si, users, pos, neg):
    """PHR's loss as three separate PNet evaluations, one row's map at a time."""
    d_t, d_s = method.teacher_user.shape[1], method.student_dim

    def loss_of(t, s, ids):
        total = 0.0
        for e in ids.tolist():
            w = method.pnet(t[e : e + 1].to(s.dtype)).view(d_t, d_s)
            total = total + ((t[e].to(s.dtype) - w @ s[e]) ** 2).sum()
        return total

    tu, ti = method.teacher_user, method.teacher_item
    return method.lambda_phr * (
        loss_of(tu, su, users.unique())
        + 0.5 * (loss_of(ti, si, pos.unique()) + loss_of(ti, si, neg.unique()))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_phr_matches_per_row_loop(dtype):
    tu, ti, su, si, users, pos, neg = entity_setup(dtype=dtype, b=10)
    m = kdfast.PHR.build(tu, ti, None, 4, generator=torch.Generator().manual_seed(7)).to(dtype)
    leaves = [su, si, *m.parameters()]
    got = values_and_grads(lambda: m(su, si, users, pos, neg), leaves)
    want = values_and_grads(lambda: phr_loop(m, su, si, users, pos, neg), leaves)
    assert_same(got, want, dtype)
