"""The contract every registered KD method keeps (parametrised over the registry, so a new method is
covered as soon as it is registered): it builds on a small random teacher, gives a finite positive
loss whose gradients reach both student tables, rejects bad batches and bad teacher tables the same
way as every other method, has its options checked by the registry and by build with the same rules,
reproduces a seeded run, and never holds the student."""

import pytest
import torch

import kdfast
from kdfast.methods import base, registry
from kdfast.methods.registry import METHODS, method_class, validate_options
from tests.methods._helpers import assert_finite_loss_with_gradient, teacher_setup

NAMES = sorted(METHODS)
n_users, n_items, D = 40, 150, 6
# options for the methods whose defaults need a larger catalog than the test teacher's; any other
# method is built with its registry defaults
SMALL = {
    "rrd": {"N": 20, "K": 8, "L": 8},
    "rrd-full": {"N": 20, "K": 8},
    "ir-rrd": {"N": 20, "K": 8, "L": 8, "N_I": 10, "K_I": 4, "L_I": 4},
    "dcd": {"N": 12, "K": 5},
}


def _build(name, seed=0):
    cls, _ = method_class(name)
    tu, ti, train, _ = teacher_setup(n_users=n_users, n_items=n_items)
    opts = validate_options(name, SMALL.get(name, {}))
    return cls.build(tu, ti, train, D, generator=torch.Generator().manual_seed(seed), **opts)


def _student(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.nn.Parameter(torch.randn(n_users, D, generator=g) * 0.3),
        torch.nn.Parameter(torch.randn(n_items, D, generator=g) * 0.3),
    )


def _batch(seed=2, n=48):
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users, (n,), generator=g)
    return (
        users,
        torch.randint(0, n_items, (n,), generator=g),
        torch.randint(0, n_items, (n,), generator=g),
    )


def test_registry():
    assert "none" not in METHODS  # plain BPR is the callers' business
    assert base.METHODS is registry.METHODS and base.method_class is registry.method_class
    assert method_class("rrd-full") == (kdfast.RRD, {"sampling": False})
    with pytest.raises(ValueError, match="unknown KD method 'bogus'; known: none, cd"):
        method_class("bogus")
    with pytest.raises(ValueError, match="unknown KD method"):
        validate_options("bogus", {})


@pytest.mark.parametrize("name", NAMES)
def test_registered_class_is_a_public_kd_method(name):
    cls, _ = method_class(name)
    assert issubclass(cls, base.KDMethod)
    assert getattr(kdfast, cls.__name__) is cls


@pytest.mark.parametrize("name", NAMES)
def test_finite_positive_loss_with_gradient_to_both_tables(name):
    m = _build(name)
    su, si = _student()
    m.start_epoch(0, 3, su.detach(), si.detach())
    loss = m(su, si, *_batch())
    assert_finite_loss_with_gradient(loss, su, si)
    assert m.status() is None or isinstance(m.status(), str)


@pytest.mark.parametrize("name", NAMES)
def test_bad_batches_rejected(name):
    m = _build(name)
    su, si = _student()
    m.start_epoch(0, 3, su.detach(), si.detach())
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="same length"):
        m(su, si, torch.tensor([0, 1]), one, one)
    with pytest.raises(ValueError, match="users holds ids outside"):
        m(su, si, torch.tensor([n_users]), one, one)
    with pytest.raises(ValueError, match="users holds ids outside"):
        m(su, si, torch.tensor([-1]), one, one)
    with pytest.raises(ValueError, match="pos holds ids outside"):
        m(su, si, one, torch.tensor([n_items]), one)
    with pytest.raises(ValueError, match="neg holds ids outside"):
        m(su, si, one, one, torch.tensor([n_items]))
    with pytest.raises(TypeError, match="users must be an integer tensor"):
        m(su, si, one.float(), one, one)
    with pytest.raises(ValueError, match="pos must be 1-D"):
        m(su, si, one, one[None], one)
    for bad_u, bad_i in ((su[:5], si), (su, si[:5]), (su, si[:, :3]), (su[:, :3], si[:, :3])):
        if bad_u.shape[1] == bad_i.shape[1] and m.student_dim is None:
            continue  # another width of both tables is fine where the method does not fix it
        with pytest.raises(ValueError, match="student tables must be"):
            m(bad_u, bad_i, one, one, one)
    with pytest.raises(TypeError, match="student_item must be a floating"):
        m(su, si.long(), one, one, one)


@pytest.mark.parametrize("name", NAMES)
def test_bad_teacher_tables_rejected(name):
    cls, defaults = method_class(name)
    tu, ti, train, _ = teacher_setup(n_users=n_users, n_items=n_items)
    opts = {**defaults, **SMALL.get(name, {})}
    with pytest.raises(ValueError, match="teacher_user must be 2-D"):
        cls.build(tu[0], ti, train, D, **opts)
    with pytest.raises(TypeError, match="teacher_item must be a floating"):
        cls.build(tu, ti.long(), train, D, **opts)
    with pytest.raises(ValueError, match="same dimension"):
        cls.build(tu, ti[:, :5], train, D, **opts)


def _wrong_type(default):
    """A value of another type than the option's default."""
    if isinstance(default, bool):
        return 1
    if isinstance(default, int):
        return 2.5
    if isinstance(default, float):
        return "1.0"
    return 3  # a string option


@pytest.mark.parametrize("name", NAMES)
def test_options_checked_by_registry_and_build_alike(name):
    cls, defaults = method_class(name)
    options = cls.option_defaults()
    assert options, f"{name}: build takes no options"
    assert validate_options(name, {}) == defaults
    # a misspelt name: ValueError naming the method and listing every valid option
    typo = sorted(options)[0] + "x"
    with pytest.raises(ValueError, match=f"{name}: unknown option") as err:
        validate_options(name, {typo: 1})
    assert all(opt in str(err.value) for opt in options)
    tu, ti, train, _ = teacher_setup(n_users=n_users, n_items=n_items)
    for opt, default in options.items():
        if default is None:
            continue
        # a value of the wrong type, and (numbers) a negative value: every count, weight and
        # temperature of a method is >= 0
        bad = [(TypeError, _wrong_type(default))]
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            bad.append((ValueError, -1))
        for exc, value in bad:
            with pytest.raises(exc, match=f"{name}: {opt} "):
                validate_options(name, {opt: value})
            with pytest.raises(exc, match=f"{opt} "):  # build: the same rule, before any work
                cls.build(tu, ti, train, D, **{**defaults, opt: value})


@pytest.mark.parametrize("name", NAMES)
def test_seeded_runs_reproduce(name):
    runs = []
    for _ in range(2):
        m = _build(name, seed=7)
        su, si = _student()
        out = []
        for epoch in range(2):
            m.start_epoch(epoch, 2, su.detach(), si.detach())
            su.grad = si.grad = None
            loss = m(su, si, *_batch(seed=epoch))
            loss.backward()
            out += [loss.detach(), su.grad.clone(), si.grad.clone()]
        runs.append(out)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("name", NAMES)
def test_method_never_holds_the_student(name):
    m = _build(name)
    su, si = _student()
    m.start_epoch(0, 3, su.detach(), si.detach())
    assert not {id(su), id(si)} & {id(p) for p in m.parameters()}
    assert all(not b.requires_grad for b in m.buffers())
    assert not {"teacher_user", "teacher_item"} & set(m.state_dict())  # the teacher is not saved
    m(su, si, *_batch()).backward()
    kept = su.detach().clone()
    del m
    assert torch.equal(su.detach(), kept)
