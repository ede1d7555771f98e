"""Hostile inputs: each case once ended in a traceback from inside PyTorch, a wrong message or a
silently wrong number. Each must give the right result or a clear error naming the argument, the
same on every backend. (Cases that could kill the process run in a subprocess:
tests/test_native_errors.py.)"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kdfast
from kdfast.cli import main
from kdfast.sampling import exclusion_keys, rank_discounted_sample, uniform_excluding_sample
from tests.conftest import backend_params

SAMPLERS = backend_params("torch", "cpp")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("backend", SAMPLERS)
def test_rank_sampler_tiny_temperature_takes_the_first_positions(backend):
    """T -> 0 concentrates the law on ranks 1..k: the limit, on both backends (the tensor sampler
    used to return late positions once 1/T overflowed)."""
    for t in (1e-308, 1e-320, 1e-30):
        pos = rank_discounted_sample(
            4, 50, 5, t, generator=torch.Generator().manual_seed(0), backend=backend
        )
        assert pos.tolist() == [[0, 1, 2, 3, 4]] * 4


@pytest.mark.parametrize("backend", SAMPLERS)
def test_user_built_excluded_keys_are_checked_on_every_backend(backend):
    good = exclusion_keys(2, 10, (torch.tensor([0, 2, 3]), torch.tensor([1, 4, 5])))
    out = uniform_excluding_sample(2, 10, 3, excluded_keys=good, backend=backend)
    assert not set(out[0].tolist()) & {1, 4} and 5 not in out[1].tolist()
    keys, counts = good
    cases = [
        ((keys.flip(0), counts), "not sorted"),
        ((keys, counts + 1), "sum to"),
        ((keys, torch.tensor([1, 2])), "outside row 1"),
        ((keys, counts[:1]), "counts for 1 rows"),
        ((keys.float(), counts), "integer"),
    ]
    for bad, fragment in cases:
        with pytest.raises((ValueError, TypeError), match=fragment):
            uniform_excluding_sample(2, 10, 3, excluded_keys=bad, backend=backend)


# ------------------------------------------------------------------------------------------ devices
def test_meta_tensors_get_a_clear_error():
    q, keys = torch.empty(3, 4, device="meta"), torch.empty(5, 4, device="meta")
    with pytest.raises(ValueError, match="meta device hold no data"):
        kdfast.topk_scores(q, keys, 2)
    with pytest.raises(ValueError, match="meta device hold no data"):
        kdfast.plackett_luce_loss(torch.empty(2, 3, device="meta"))
    with pytest.raises(ValueError, match="meta device hold no data"):
        kdfast.topology_loss(q, q)


def test_exclusion_csr_on_another_device_than_the_queries():
    """The CSR follows the queries (it is index data): no error from inside PyTorch."""
    q, keys = torch.randn(2, 3), torch.randn(6, 3)
    excl = (torch.tensor([0, 1, 2]), torch.tensor([4, 0]))
    v, i = kdfast.topk_scores(q, keys, 6, exclude=excl, backend="torch")
    assert 4 not in i[0].tolist() and 0 not in i[1].tolist()


# ------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("name", ["de", "phr", "ftd", "htd", "dcd", "rd"])
def test_methods_name_wrong_student_tables_and_bad_ids(name):
    from kdfast.methods.registry import method_class
    from tests.methods._helpers import teacher_setup

    tu, ti, train, g = teacher_setup()
    cls, defaults = method_class(name)
    small = {"dcd": {"N": 10, "K": 5}, "rd": {"K": 5}}.get(name, {})
    m = cls.build(tu, ti, train, 6, generator=g, **{**defaults, **small})
    su, si = torch.randn(tu.shape[0], 6), torch.randn(ti.shape[0], 6)
    one = torch.tensor([0])
    if name in ("dcd", "rd"):  # they rank with the student's tables in start_epoch
        with pytest.raises(ValueError, match="student tables"):
            m.start_epoch(10, 20, su[:5], si)
    m.start_epoch(10, 20, su, si)
    with pytest.raises(ValueError, match="users holds ids outside"):
        m(su, si, torch.tensor([-1]), one, one)
    with pytest.raises(ValueError, match="pos holds ids outside"):
        m(su, si, one, torch.tensor([ti.shape[0]]), one)
    with pytest.raises(ValueError, match="same length"):
        m(su, si, torch.tensor([0, 1]), one, one)


# -------------------------------------------------------------------------------------- files, CLI
DISTILL = "distill --synthetic-users 60 --synthetic-items 50 --n-neg 20 --epochs 2".split() + [
    *"--teacher-dim 8 --student-dim 4 --no-progress".split()
]


def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_ids_beyond_int64_in_a_data_file(tmp_path, capsys):
    f = tmp_path / "users.dat"
    f.write_text("2 1 " + str(10**30) + "\n1 3\n")
    err = _err(capsys, ["distill", "--data", str(f), "--epochs", "1", "--out", str(tmp_path / "o")])
    assert "line 1" in err and "does not fit in a 64-bit integer" in err and "Traceback" not in err
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("".join(f"{u},{i}\n" for u in range(3) for i in range(6)) + f"1,{10**30}\n")
    data = kdfast.data.load_pairs(pairs, min_user_interactions=1)  # a too-large id is a name
    assert data.n_items == 7


@pytest.mark.parametrize("content", [b"", b"junk", b"not a torch file", b"PK\x03\x04 broken zip"])
def test_corrupt_teacher_file_says_how_to_retrain(tmp_path, capsys, content):
    t = tmp_path / "teacher.pt"
    t.write_bytes(content)
    err = _err(capsys, DISTILL + ["--teacher", str(t), "--out", str(tmp_path / "o")])
    assert "unreadable" in err and "--teacher" in err and "Traceback" not in err


def test_bad_option_fails_before_the_teacher_trains(tmp_path, capsys):
    out = tmp_path / "o"
    err = _err(capsys, ["distill", "--methods", "rrd", "--option", "rrd.Nn=5", "--out", str(out)])
    assert "Nn" in err and not (out / "teacher.pt").exists()


def test_topk_out_names_the_file_it_wrote(tmp_path, capsys):
    assert main(["topk", "--demo", "5", "7", "3", "-k", "2", "--out", str(tmp_path / "top")]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "top.npz").exists() and f"wrote {tmp_path / 'top.npz'}" in err
    with np.load(tmp_path / "top.npz") as z:
        assert z["indices"].shape == (5, 2)


def test_a_rerun_keeps_the_earlier_results(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(DISTILL + ["--out", str(out)]) == 0
    first = (out / "results.json").read_text()
    assert main(DISTILL + ["--out", str(out), "--methods", "none,ftd"]) == 0
    kept = sorted(out.glob("results-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == first
    assert "ftd" in (out / "results.json").read_text()
    assert "kept as results-" in capsys.readouterr().out


def test_a_second_run_on_a_busy_out_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / ".kdfast-distill.lock").write_text(str(holder.pid))
        err = _err(capsys, DISTILL + ["--out", str(out)])
        assert "in use by another kdfast distill" in err and not (out / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(DISTILL + ["--out", str(out)]) == 0  # the lock of a finished process is taken over
    assert not (out / ".kdfast-distill.lock").exists()


def test_atomic_writes_use_private_temporary_names(tmp_path):
    """Two writers of one file never share a temporary file (they used to, as NAME.part)."""
    script = (
        "import sys, torch; from kdfast.models import save_teacher\n"
        "for _ in range(30): save_teacher(sys.argv[1], torch.zeros(3, 2), torch.zeros(4, 2), {})\n"
    )
    target = str(tmp_path / "t.pt")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", script, target], env=env) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    user, item, _ = kdfast.models.load_teacher(target)
    assert user.shape == (3, 2) and not list(tmp_path.glob("*.part"))


# ------------------------------------------------------------------------------ non-finite inputs
NAN, INF = float("nan"), float("inf")


def _pl_rows(backend, ranked, unranked, log_tail):
    dev = "cpu" if backend == "cpp" else ("cuda" if torch.cuda.is_available() else "cpu")
    r, u, t = (
        None if x is None else torch.tensor(x, dtype=torch.float32, device=dev)
        for x in (ranked, unranked, log_tail)
    )
    return kdfast.plackett_luce_loss(r, u, log_tail=t, reduction="none", backend=backend).cpu()


@pytest.mark.parametrize("backend", backend_params("torch", "cpp", "triton"))
def test_plackett_luce_non_finite_rule(backend):
    """The rule of docs (README, Plackett-Luce): -inf is padding; a NaN among a row's ranked scores,
    unranked scores or log_tail makes its loss NaN; a +inf unranked score or log_tail makes it +inf.
    Rows without them are untouched."""
    ranked = [[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [NAN, 0.5]]
    unranked = [[0.2, NAN], [0.2, INF], [0.2, -INF], [-INF, -INF], [-INF, -INF], [0.2, 0.1]]
    log_tail = [0.0, 0.0, 0.0, NAN, INF, 0.0]
    got = _pl_rows(backend, ranked, unranked, log_tail)
    assert torch.isnan(got[0]) and torch.isposinf(got[1]) and torch.isfinite(got[2])
    assert torch.isnan(got[3]) and torch.isposinf(got[4]) and torch.isnan(got[5])
    padded = _pl_rows(backend, [[1.0, 0.5]], [[0.2]], [0.0])
    torch.testing.assert_close(got[2:3], padded)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp", "triton"))
def test_plackett_luce_from_embeddings_non_finite_rule(backend):
    """The same rule when a score is gathered from a non-finite embedding."""
    dev = "cpu" if backend == "cpp" else ("cuda" if torch.cuda.is_available() else "cpu")
    q = torch.ones(3, 2, device=dev)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [NAN, 0.0], [INF, 0.0]], device=dev)
    ranked = torch.tensor([[0, 1]] * 3, device=dev)
    unranked = torch.tensor([[2, -1], [3, -1], [-1, -1]], device=dev)
    got = kdfast.plackett_luce_loss_from_embeddings(
        q, e, ranked, unranked, reduction="none", backend=backend
    ).cpu()
    assert torch.isnan(got[0]) and torch.isposinf(got[1]) and torch.isfinite(got[2])


@pytest.mark.parametrize("backend", backend_params("torch", "cpp", "triton"))
def test_topology_losses_are_scale_free_per_row(backend):
    """Cosines do not depend on a row's scale: rows of norm 1e20 or 1e-25 in float32 (whose squares
    overflow or underflow) give the loss of the unscaled rows, not that of zero rows."""
    dev = "cpu" if backend == "cpp" else ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    scale = torch.tensor([1e20, 1e-25, 1.0, 1e15, 1e-18, 3.0])[:, None]
    groups = torch.tensor([0, 0, 1, 1, 0, 1], device=dev)

    def losses(t, s):
        t, s = t.to(dev), s.to(dev)
        return (
            kdfast.topology_loss(t, s, backend=backend).cpu(),
            kdfast.grouped_topology_loss(t, s, groups, 2, backend=backend).cpu(),
        )

    for got, want in zip(losses(t * scale, s * scale), losses(t, s)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params("torch", "cpp", "triton"))
def test_topk_non_finite_scores_rank_last(backend):
    """A score that is not finite - NaN, or a float32 dot product that overflows, whose sign would
    depend on the summation order (+inf and -inf partial sums) - ranks as -inf on every backend and
    instruction set, ties to the lower index."""
    dev = "cpu" if backend == "cpp" else ("cuda" if torch.cuda.is_available() else "cpu")
    big = 3e38
    keys = torch.zeros(40, 32)
    keys[3, :16], keys[3, 16:] = big, -big  # partial sums overflow to +inf and -inf: inf - inf
    keys[5, :] = big  # overflows to +inf
    keys[7, 0] = NAN
    keys[9, 0] = 1.0  # the one positive finite score
    keys[11, 0] = -1.0  # the one negative finite score
    q = torch.ones(2, 32)
    v, i = kdfast.topk_scores(q.to(dev), keys.to(dev), 40, backend=backend)
    zeros = [j for j in range(40) if j not in (3, 5, 7, 9, 11)]
    want = [9] + zeros + [11, 3, 5, 7]  # the non-finite last, by index
    for row_v, row_i in zip(v.cpu(), i.cpu()):
        assert row_i.tolist() == want
        assert row_v[0] == 1.0 and torch.isneginf(row_v[-3:]).all()
