"""HTD against a direct N x N re-computation of docs/METHODS.md section 4, including the authors'
quirks (no gradient through the prototypes, the teacher-cosine filter)."""

import pytest
import torch

import kdfast
from kdfast.methods.htd import group_means
from tests.conftest import backend_params
from tests.methods._helpers import batch_rows, cos_matrix, entity_setup


def _setup(seed=0):
    return entity_setup(d_t=10, d_s=4, n_u=25, n_i=40, seed=seed, b=24, dtype=torch.float64)


def _htd_direct(m, tu, ti, su, si, users, pos, neg):
    """docs/METHODS.md section 4 written out with N x N matrices, reusing m's assignment nets,
    experts and noise."""
    t, s, u, i = batch_rows(tu, ti, su, si, users, pos, neg)
    k = m.n_groups
    ga = 0.0
    groups = []
    for off, side, ids, tt, ss in ((0, "user", u, tu, su), (k, "item", i, ti, si)):
        v = torch.softmax(tt[ids] @ m.assign[side].weight.T + m.assign[side].bias, dim=1)
        groups.append(v.argmax(1) + off)
        r = torch.rand(v.shape, generator=m._noise, dtype=v.dtype)
        z = torch.softmax(
            (torch.log(v + 1e-10) - torch.log(-torch.log(r + 1e-20) + 1e-20)) / m.tau, dim=1
        )
        e = m.experts[side]
        hhat = sum(
            z[:, j : j + 1] * (torch.relu(ss[ids] @ e.w1[j] + e.b1[j]) @ e.w2[j] + e.b2[j])
            for j in range(k)
        )
        ga = ga + ((tt[ids] - hhat) ** 2).sum()
    groups = torch.cat(groups)
    ct, cs = cos_matrix(t, t), cos_matrix(s, s)
    mask = groups[:, None] == groups[None, :]
    if m.teacher_cos_filter:
        mask &= ct > 0
    ent = (((cs - ct) ** 2) * mask).sum()
    present = torch.stack([(groups == g).any() for g in range(2 * k)])
    pt = torch.stack(
        [
            t[groups == g].mean(0) if present[g] else torch.zeros(t.shape[1], dtype=t.dtype)
            for g in range(2 * k)
        ]
    )[present]
    ps = torch.stack(
        [
            s[groups == g].mean(0) if present[g] else torch.zeros(s.shape[1], dtype=s.dtype)
            for g in range(2 * k)
        ]
    )[present]
    if m.group_level == "second":
        grp = ((cos_matrix(s, ps.detach()) - cos_matrix(t, pt)) ** 2).sum()
    else:
        grp = ((cos_matrix(ps, ps) - cos_matrix(pt, pt)) ** 2).sum()
    return m.lambda_td * (m.alpha * (ent + grp) + (1 - m.alpha) * ga)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
@pytest.mark.parametrize("filt", [True, False])
@pytest.mark.parametrize("level", ["second", "first"])
def test_htd_matches_direct_formula(backend, filt, level):
    tu, ti, su, si, users, pos, neg = _setup(seed=1)
    m = kdfast.HTD.build(
        tu,
        ti,
        None,
        4,
        generator=torch.Generator().manual_seed(2),
        n_groups=3,
        teacher_cos_filter=filt,
        group_level=level,
        alpha=0.3,
        backend=backend,
    ).double()
    m.start_epoch(1, 10, su, si)
    state = m._noise.get_state()
    got = m(su, si, users, pos, neg)
    got.backward()
    g_u, g_i, g_a = su.grad.clone(), si.grad.clone(), m.assign["user"].weight.grad.clone()
    su.grad = si.grad = None
    m.zero_grad()
    m._noise.set_state(state)
    want = _htd_direct(m, tu, ti, su, si, users, pos, neg)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_u, su.grad)
    torch.testing.assert_close(g_i, si.grad)
    torch.testing.assert_close(g_a, m.assign["user"].weight.grad)


def test_htd_no_gradient_through_prototypes():
    # 'second': the loss gradient equals that of a version where the student prototypes are
    # constants
    tu, ti, su, si, users, pos, neg = _setup(seed=3)
    m = kdfast.HTD.build(
        tu, ti, None, 4, generator=torch.Generator().manual_seed(4), n_groups=2
    ).double()
    t, s, _, _ = batch_rows(tu, ti, su, si, users, pos, neg)
    groups = torch.arange(t.shape[0]) % 4
    s_leaf = s.detach().clone().requires_grad_()
    m.group_level_loss(t, s_leaf, groups).backward()
    ps, present = group_means(s.detach(), groups, 4)
    pt, _ = group_means(t, groups, 4)
    s2 = s.detach().clone().requires_grad_()
    ((cos_matrix(s2, ps[present]) - cos_matrix(t, pt[present])) ** 2).sum().backward()
    torch.testing.assert_close(s_leaf.grad, s2.grad)
    s3 = s.detach().clone().requires_grad_()
    # with gradient through the prototypes the result differs: the quirk is observable
    ps3 = torch.stack([s3[groups == g].mean(0) for g in range(4)])
    ((cos_matrix(s3, ps3) - cos_matrix(t, pt)) ** 2).sum().backward()
    assert not torch.allclose(s3.grad, s2.grad)


def test_group_means_skips_empty_groups():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    means, present = group_means(x, torch.tensor([0, 2, 0]), 4)
    assert present.tolist() == [True, False, True, False]
    torch.testing.assert_close(means[0], torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(means[2], torch.tensor([3.0, 4.0]))


def test_htd_alpha_edges_and_drop():
    tu, ti, su, si, users, pos, neg = _setup(seed=5)
    m1 = kdfast.HTD.build(
        tu, ti, None, 4, generator=torch.Generator().manual_seed(6), alpha=1.0
    ).double()
    m1(su, si, users, pos, neg).backward()
    assert all(p.grad is None for p in m1.experts.parameters())  # alpha = 1: no GA loss
    assert id(su) not in {id(p) for p in m1.parameters()}
    m0 = kdfast.HTD.build(
        tu, ti, None, 4, generator=torch.Generator().manual_seed(6), alpha=0.0
    ).double()
    m0(su, si, users, pos, neg).backward()
    assert m0.assign["item"].weight.grad is not None


def test_bad_options():
    tu, ti, *_ = _setup()
    for kw, exc, msg in [
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"alpha": -0.1}, ValueError, "alpha"),
        ({"n_groups": 0}, ValueError, "n_groups must be >= 1"),
        ({"group_level": "third"}, ValueError, "group_level"),
        ({"teacher_cos_filter": "yes"}, TypeError, "teacher_cos_filter"),
    ]:
        with pytest.raises(exc, match=msg):
            kdfast.HTD.build(tu, ti, None, 4, **kw)


def test_htd_select_only_below_evaluates_the_selected_expert():
    """Below the threshold the GA term uses only the argmax expert: with the same Gumbel noise the
    loss equals the full mixture evaluated on the one-hot (hardened) weights at a tiny temperature,
    and above the threshold both modules agree exactly."""
    tu, ti, su, si, users, pos, neg = _setup(seed=8)
    kw = dict(alpha=0.0)
    full = kdfast.HTD.build(
        tu, ti, None, 4, generator=torch.Generator().manual_seed(9), **kw
    ).double()
    sel = kdfast.HTD.build(
        tu, ti, None, 4, generator=torch.Generator().manual_seed(9), select_only_below=0.5, **kw
    ).double()
    for tau in (1.0, 1e-8):
        full.tau = sel.tau = tau
        a, b = full(su, si, users, pos, neg), sel(su, si, users, pos, neg)
        assert torch.allclose(a, b, rtol=1e-9)
    with pytest.raises(ValueError, match="select_only_below"):
        kdfast.HTD.build(tu, ti, None, 4, select_only_below=0.0)
