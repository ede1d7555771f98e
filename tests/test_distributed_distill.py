"""kdfast distill on two processes (torch.distributed, gloo, CPU): the data-parallel run completes,
writes the documented results, repeats itself bit for bit, and ranks like the one-process run; a
rank that raises ends every rank with an error instead of a hang."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from kdfast.cli import main

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "distill",
    "--data",
    "synthetic",
    "--synthetic-users",
    "300",
    "--synthetic-items",
    "200",
    "--n-neg",
    "40",
    "--teacher-dim",
    "16",
    "--student-dim",
    "4",
    "--epochs",
    "3",
    "--lr",
    "0.01",
    "--no-progress",
    "--threads",
    "1",
]
RRD = ["--option", "rrd.N=40", "--option", "rrd.K=8", "--option", "rrd.L=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, KDFAST_BACKEND="torch", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(_free_port()), "-m", "kdfast", *RUN, *args, "--out", str(out)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_two_processes_complete_repeat_and_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    methods = ["--methods", "none,rrd,de", *RRD]
    assert main([*RUN, *methods, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = _torchrun(tmp_path / "two", *methods)
    again = _torchrun(tmp_path / "again", *methods)
    sparse = _torchrun(tmp_path / "sparse", *methods, "--grad-sync", "sparse")
    schema = json.loads((ROOT / "docs" / "results.schema.json").read_text())
    jsonschema.validate(two, schema)
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    for name in ("none", "rrd", "de"):
        assert again["students"][name]["history"] == two["students"][name]["history"]  # repeats
        # the touched rows by all_gather sum as the dense all_reduce does (two ranks: bit for bit)
        assert sparse["students"][name]["history"] == two["students"][name]["history"]
        assert (tmp_path / "two" / "students" / f"{name}.pt").exists()
    # BPR's sums over a batch's users are those of one process: the same rankings up to the order
    # of float32 sums (losses to 1e-6 relative, metrics equal at this size)
    h1, h2 = one["students"]["none"]["history"], two["students"]["none"]["history"]
    assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-6)
    assert [h["valid"] for h in h2] == [pytest.approx(h["valid"], abs=1e-12) for h in h1]
    # RRD's ranks sample their own users' lists from their own generators, and DE's sums over a
    # batch's unique items count an item once per rank holding it: close to one process only
    for name in ("rrd", "de"):
        m1, m2 = one["students"][name]["test"], two["students"][name]["test"]
        assert m2 == pytest.approx(m1, abs=0.05)


def test_a_failing_rank_ends_every_rank(tmp_path):
    """Two processes started by hand (no torchrun agent to stop the others): rank 1 raises in its
    second epoch; rank 0, waiting in the step's all_reduce, must fail too, with an error, well
    before the --dist-timeout of 120 s."""
    port = _free_port()
    script = str(ROOT / "tests" / "_distill_rank_fails.py")
    args = [*RUN, "--methods", "fails-on-rank-1", "--dist-timeout", "120"]
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = ["--out", str(tmp_path / f"out{rank}")]
        procs.append(
            subprocess.Popen(
                [sys.executable, script, *args, *out],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    t0 = time.monotonic()
    texts = [p.communicate(timeout=110)[0] for p in procs]  # a hang fails here
    assert time.monotonic() - t0 < 110
    assert procs[1].returncode != 0 and "this method fails on rank 1" in texts[1]
    assert procs[0].returncode != 0, texts[0]
    assert "data-parallel training" in texts[0] or "collective" in texts[0], texts[0][-2000:]


class _Stop(Exception):
    pass


def _resume_worker(rank, world, init_file, out_dir):
    """RRD trained data-parallel (its sampling sharded by user) for 4 epochs; then again, stopped
    after validating epoch 3 (its last checkpoint: epoch 2) and resumed."""
    from kdfast import experiment as ex
    from kdfast import train as tr
    from tests.test_distributed import _init, _save

    _init(rank, world, init_file)
    spec = ex.DataSpec(data="synthetic", synthetic_users=120, synthetic_items=150, protocol="full")
    dataset, split = ex.load_split(spec)
    train = ex.TrainSpec(epochs=4, batch_size=256, eval_every=1, patience=20)
    teacher = ex.get_teacher(dataset, split, spec, ex.TeacherSpec("bprmf", 16), train, log=None)

    def student(**kw):
        opts = {"N": 40, "K": 8, "L": 8}
        return ex.train_student(split, teacher, "rrd", opts, student_dim=8, train=train, log=None,
                                **kw)  # fmt: skip

    full = student()
    path = Path(out_dir) / "ck.pt"
    validate = tr.Trainer._validate

    def stop_after_3(self, epoch, *args):
        validate(self, epoch, *args)
        if epoch == 3:
            raise _Stop

    tr.Trainer._validate = stop_after_3
    try:
        student(checkpoint=path)
    except _Stop:
        pass
    tr.Trainer._validate = validate
    rank_file = path.with_name("ck.pt.rank1")
    written = rank_file.exists()
    resumed = student(checkpoint=path, resume=True)
    missing = None
    if rank == 1:  # without its share, rank 1 cannot resume (the finished run returns no samples)
        rank_file.unlink()
        try:
            student(checkpoint=path, resume=True)
        except ValueError as exc:
            missing = str(exc)
    _save(out_dir, rank, {"full": full, "resumed": resumed, "written": written, "missing": missing})


def test_sharded_sampling_resumes_bit_for_bit(tmp_path):
    from tests.test_distributed import _load, _spawn

    assert _spawn(_resume_worker, tmp_path) == [0, 0]
    for rank in (0, 1):
        got = _load(tmp_path, rank)
        full, resumed = got["full"], got["resumed"]
        assert got["written"] and resumed["resumed_from"] == 2
        assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
        assert [h["valid"] for h in resumed["history"]] == [h["valid"] for h in full["history"]]
        assert resumed["test"] == full["test"]
    assert "missing" in _load(tmp_path, 1)["missing"]
    # the ranks sampled apart and still took the same steps: one result on both
    assert _load(tmp_path, 0)["full"]["test"] == _load(tmp_path, 1)["full"]["test"]


def _grad_sync_worker(rank, world, init_file, out_dir):
    """Each rank's gradients (rows of the tables zero where a rank did not touch them, a table
    with no gradient on any rank, one with a gradient on rank 0 only, a 1-D parameter) summed by
    every grad_sync mode."""
    from kdfast.train import _sum_grads
    from tests.test_distributed import _init, _save

    _init(rank, world, init_file)
    out = {}
    for mode in ("dense", "sparse", "auto"):
        g = torch.Generator().manual_seed(rank)
        params = [
            torch.nn.Parameter(torch.zeros(shape)) for shape in ((50, 6), (9, 3), (7, 2), (5,))
        ]
        touched = torch.randperm(50, generator=g)[:12]
        params[0].grad = torch.zeros(50, 6)
        params[0].grad[touched] = torch.randn(12, 6, generator=g)
        if rank == 0:
            params[2].grad = torch.randn(7, 2, generator=g)
        params[3].grad = torch.randn(5, generator=g)
        _sum_grads(params, None, mode)
        out[mode] = [None if p.grad is None else p.grad.clone() for p in params]
    _save(out_dir, rank, out)


def test_grad_sync_modes_sum_alike_on_every_rank(tmp_path):
    from tests.test_distributed import _load, _spawn

    assert _spawn(_grad_sync_worker, tmp_path, world=3) == [0, 0, 0]
    got = [_load(tmp_path, r) for r in range(3)]
    want = []  # the sums, computed here from the same draws
    for r in range(3):
        g = torch.Generator().manual_seed(r)
        touched = torch.randperm(50, generator=g)[:12]
        t = torch.zeros(50, 6)
        t[touched] = torch.randn(12, 6, generator=g)
        extra = torch.randn(7, 2, generator=g) if r == 0 else None
        want.append((t, extra, torch.randn(5, generator=g)))
    for mode in ("dense", "sparse", "auto"):
        for r in range(3):
            a = got[r][mode]
            for x in (0, 2, 3):  # every rank holds the same sums
                assert torch.equal(a[x], got[0][mode][x])
            assert a[1] is None  # no rank had a gradient: Adam skips it
            torch.testing.assert_close(a[0], sum(w[0] for w in want), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a[2], want[0][1])
            torch.testing.assert_close(a[3], sum(w[2] for w in want), rtol=1e-6, atol=1e-6)


def _split_and_model(protocol):
    from kdfast import experiment as ex
    from kdfast.models import BPRMF

    torch.manual_seed(3)
    spec = ex.DataSpec(
        data="synthetic", synthetic_users=101, synthetic_items=80, protocol=protocol, n_neg=30
    )
    _, split = ex.load_split(spec)
    return split, BPRMF(split.n_users, split.n_items, 8)


def _evaluate_worker(rank, world, init_file, out_dir):
    """Trainer.evaluate split by users over the ranks, for both protocols and parts."""
    from kdfast.train import Trainer
    from tests.test_distributed import _init, _save

    _init(rank, world, init_file)
    out = {}
    for protocol in ("loo", "full"):
        split, model = _split_and_model(protocol)
        trainer = Trainer(model, split, log=None, progress=False)
        out[protocol] = {part: trainer.evaluate(part) for part in ("valid", "test")}
    _save(out_dir, rank, out)


def test_sharded_evaluation_equals_one_process(tmp_path):
    """101 users over 3 ranks (blocks of 33, 34, 34): every rank returns the one-process metrics
    (full ranking: to float64 rounding)."""
    from kdfast.train import Trainer
    from tests.test_distributed import _load, _spawn

    assert _spawn(_evaluate_worker, tmp_path, world=3) == [0, 0, 0]
    for protocol in ("loo", "full"):
        split, model = _split_and_model(protocol)
        trainer = Trainer(model, split, log=None, progress=False)
        want = {part: trainer.evaluate(part) for part in ("valid", "test")}
        for rank in range(3):
            got = _load(tmp_path, rank)[protocol]
            if protocol == "loo":  # the held-out ranks are gathered: the same numbers
                assert got == want, rank
            else:  # per-user sums added per rank, then over ranks: float64 rounding apart
                for part in want:
                    assert got[part] == pytest.approx(want[part], rel=1e-12, abs=0), (part, rank)


def _hetcomp_worker(rank, world, init_file, out_dir):
    """HetComp sharded over the ranks against one unsharded copy: after each knowledge
    construction with the same student tables, the rank's selected checkpoints, ensemble lists and
    distances are the unsharded method's at its users, and the phase and mean checkpoints (a total
    over every user) are the same; a loss of the rank's users equals the unsharded loss."""
    import torch.distributed as dist

    from tests.methods.test_hetcomp import _small_method
    from tests.test_distributed import _init, _save

    _init(rank, world, init_file)

    def all_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    ref, su, si, _ = _small_method(period=1, start=1)
    m = _small_method(period=1, start=1)[0]
    assert m.shard_users(rank, world, all_sum=all_sum)
    own = torch.arange(rank, ref.n_users, world)
    checks = [torch.equal(m.pi_t, ref.pi_t[own])]
    g = torch.Generator().manual_seed(5)
    for epoch in range(1, 7):  # student tables drifting towards the teachers' final lists
        a, b = torch.randn(su.shape, generator=g), torch.randn(si.shape, generator=g)
        for meth in (ref, m):
            meth.dkc(epoch, a, b)
        checks += [
            torch.equal(m.selected, ref.selected[:, own]),
            torch.equal(m.pi_t, ref.pi_t[own]),
            torch.equal(m.last_dist, ref.last_dist[:, own]),
            m.phase == ref.phase,
            torch.equal(m.mean_selected, ref.mean_selected),
        ]
    users = own.repeat(3)
    pos = torch.zeros_like(users)
    loss_m = m(su, si, users, pos, pos).detach()
    loss_ref = ref(su, si, users, pos, pos).detach()
    _save(out_dir, rank, {"checks": checks, "moved": ref.dkc_calls,
                          "selected": ref.selected.sum().item(),
                          "loss": (loss_m.item(), loss_ref.item())})  # fmt: skip


def test_hetcomp_shards_its_knowledge_construction(tmp_path):
    from tests.test_distributed import _load, _spawn

    assert _spawn(_hetcomp_worker, tmp_path) == [0, 0]
    for rank in (0, 1):
        got = _load(tmp_path, rank)
        assert all(got["checks"]), got["checks"]
        assert got["moved"] == 6 and got["selected"] > 0  # construction ran and moved checkpoints
        assert got["loss"][0] == pytest.approx(got["loss"][1], rel=1e-6)
