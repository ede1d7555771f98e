"""IR-RRD: the item side's lists, the step's items, the loss as RRD's plus the item-side term, and
option errors."""

import math

import pytest
import torch

import kdfast
from tests.methods._helpers import assert_finite_loss_with_gradient
from tests.methods._helpers import teacher_setup as _setup

SMALL = dict(N=20, K=8, L=8, T=5.0, N_I=10, K_I=4, L_I=4)


def _batch(n_users, n_items, n, g):
    return (
        torch.randint(0, n_users, (n,), generator=g),
        torch.randint(0, n_items, (n,), generator=g),
        torch.randint(0, n_items, (n,), generator=g),
    )


def test_item_source_pos_finite_with_gradient():
    tu, ti, train, g = _setup()
    m = kdfast.IRRRD.build(tu, ti, train, 6, generator=g, item_source="pos", **SMALL)
    su = torch.nn.Parameter(torch.randn(24, 6, generator=g) * 0.1)
    si = torch.nn.Parameter(torch.randn(90, 6, generator=g) * 0.1)
    m.start_epoch(0, 5, su, si)
    loss = m(su, si, *_batch(24, 90, 32, g))
    assert_finite_loss_with_gradient(loss, su, si)


def test_item_side_lists_exclude_the_items_users():
    tu, ti, train, g = _setup()
    m = kdfast.IRRRD.build(tu, ti, train, 6, generator=g, **SMALL)
    side = m.item_side
    scores = ti @ tu.T
    indptr, idx = train
    for i in range(90):
        users_of_i = {u for u in range(24) if i in idx[indptr[u] : indptr[u + 1]].tolist()}
        top = side.top[i].tolist()
        want = sorted(
            (u for u in range(24) if u not in users_of_i), key=lambda u: (-float(scores[i, u]), u)
        )
        assert top == want[:10]
        assert set(side.interesting[i].tolist()) <= set(top)
        un = set(side.uninteresting[i].tolist())
        assert len(un) == 4 and not (un & users_of_i) and not (un & set(top))


@pytest.mark.parametrize("item_source", ["samples", "pos"])
def test_loss_is_rrd_plus_item_side_term(item_source):
    tu, ti, train, g = _setup()
    m = kdfast.IRRRD.build(
        tu, ti, train, 6, generator=g, item_source=item_source, lam=0.3, lam_ir=0.7, **SMALL
    )
    su, si = torch.randn(24, 6, dtype=torch.float64), torch.randn(90, 6, dtype=torch.float64)
    users, pos = torch.tensor([3, 5, 3, 7]), torch.tensor([10, 11, 10, 40])
    ub = torch.tensor([3, 5, 7])
    if item_source == "pos":
        items = torch.tensor([10, 11, 40])
    else:
        side = m.user_side
        items = torch.cat(
            [side.interesting[ub].flatten(), side.uninteresting[ub].flatten()]
        ).unique()

    def listwise(q, k, side, rows):
        """sum over rows of -sum_a [s_a - log(sum_{b>=a} exp(s_b) + sum_l exp(sbar_l))], written
        out."""
        total = 0.0
        for r in rows.tolist():
            s = [float(q[r] @ k[i]) for i in side.interesting[r].tolist()]
            t = [float(q[r] @ k[i]) for i in side.uninteresting[r].tolist()]
            tail = sum(math.exp(x) for x in t)
            total -= sum(
                s[a] - math.log(sum(math.exp(x) for x in s[a:]) + tail) for a in range(len(s))
            )
        return total

    want = 0.3 * listwise(su, si, m.user_side, ub) + 0.7 * listwise(si, su, m.item_side, items)
    assert m(su, si, users, pos, pos).item() == pytest.approx(want, rel=1e-9)


def test_bad_options():
    tu, ti, train, g = _setup()
    with pytest.raises(ValueError, match="item_source"):
        kdfast.IRRRD.build(tu, ti, train, 6, item_source="neg", **SMALL)
    with pytest.raises(ValueError, match="N_I"):
        kdfast.IRRRD.build(tu, ti, train, 6, **{**SMALL, "N_I": 3})
    with pytest.raises(ValueError, match="N_I = 30 is larger"):
        kdfast.IRRRD.build(tu, ti, train, 6, **{**SMALL, "N_I": 30})
