"""kdfast.distributed on 2 CPU processes (gloo): the sharded top-K equals the one-process op in both
layouts, evaluation equals kdfast.metrics.evaluate, `kdfast topk` under torchrun writes shards that
load back equal to the one-process output, and a failing rank makes every rank raise instead of
hanging.

Starting processes costs seconds, so one spawn runs every equality check (each result recorded by
name, one pytest test per name) and one more runs the failure cases."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import kdfast
import kdfast.distributed as kd
from kdfast._core.csr import select_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD_S = 120  # a spawn still running after this is a hang: its processes are ended
TIMEOUT_S = 3  # the process-group timeout of the failure checks

CHECKS = (
    "queries_layout",
    "queries_layout_empty_block",
    "keys_layout_all_to_all",
    "keys_layout_all_gather",
    "keys_layout_empty_shard",
    "keys_layout_key_ids_ties_across_ranks",
    "keys_layout_cosine_bias",
    "item_side_roles_swapped",
    "evaluate_queries_layout",
    "evaluate_keys_layout",
    "shard_writer_roundtrip",
    "errors_disagree",
)


# ------------------------------------------------------------------------------------ harness
def _init(rank, world, init_file, timeout_s=30):
    torch.set_num_threads(1)
    kd.init("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout_s=timeout_s)  # fmt: skip


def _spawn(fn, tmp, world=2):
    """Run fn(rank, world, init_file, out_dir) in `world` processes; returns the exit codes (a hang
    guard ends processes still running after HANG_GUARD_S)."""
    init_file = os.path.join(tmp, "init")
    ctx = mp.start_processes(
        fn, args=(world, init_file, str(tmp)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + HANG_GUARD_S
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in ctx.processes if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} process(es) still running after {HANG_GUARD_S} s: a hang"
    codes = [p.exitcode for p in ctx.processes]
    for rank, code in enumerate(codes):
        path = ctx.error_files[rank]
        if code and os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                print(f"rank {rank} failed:\n{pickle.load(f)}", file=sys.stderr)
    return codes


def _save(out_dir, rank, obj):
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(obj, f)


def _load(out_dir, rank):
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _data(seed=0, n_q=41, n_k=67, d=8):
    """Queries, keys with ties (repeated rows, spread across shard boundaries) and a NaN row, and
    ragged exclusions with repeated ids."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, d, generator=gen)
    keys = torch.randn(n_k, d, generator=gen)
    keys[[3, 40, 61, 33]] = keys[50].clone()  # ties: the tie rule decides between shards
    keys[12, 0] = float("nan")
    rows = [torch.randint(0, n_k, (r % 7,), generator=gen) for r in range(n_q)]
    rows[5] = torch.tensor([50, 50, 3])  # repeats
    indptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return q, keys, (indptr, torch.cat(rows))


def _same(got, want, rows):
    v, i = got
    wv, wi = want[0][rows[0] : rows[1]], want[1][rows[0] : rows[1]]
    assert torch.equal(i, wi), f"indices differ:\n{i}\n{wi}"
    assert torch.equal(v, wv), "values differ"
    assert (got.row_start, got.n_rows) == (rows[0], want[0].shape[0])


# ------------------------------------------------------------------------------- equality checks
def _equality_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    results = {}

    def check(name, fn):
        try:
            fn()
            results[name] = None
        except Exception:  # noqa: BLE001 - recorded, reported by the test of that name
            results[name] = traceback.format_exc()
        if os.environ.get("KDFAST_TEST_VERBOSE"):
            print(rank, name, results[name], file=sys.stderr, flush=True)

    q, keys, ex = _data()
    n_q, n_k = q.shape[0], keys.shape[0]
    k = 9
    want = kdfast.topk_scores(q, keys, k, exclude=ex)
    r0, r1 = kd.block_range(n_q, rank, world)
    my_ex = kd.slice_rows(ex, r0, r1)
    # uneven key shards, rank 1's smaller than k
    cut = 60
    k0, k1 = (0, cut) if rank == 0 else (cut, n_k)

    check(
        "queries_layout",
        lambda: _same(kd.topk_scores(q[r0:r1], keys, k, exclude=my_ex), want, (r0, r1)),
    )

    def empty_block():  # rank 0 owns no query
        a0, a1 = (0, 0) if rank == 0 else (0, n_q)
        got = kd.topk_scores(q[a0:a1], keys, k, exclude=select_rows(*ex, torch.arange(a0, a1)))
        _same(got, want, (a0, a1))
        got = kd.topk_scores(
            q[a0:a1], keys[k0:k1], k, exclude=select_rows(*ex, torch.arange(a0, a1)), layout="keys"
        )
        _same(got, want, (a0, a1))

    check("queries_layout_empty_block", empty_block)
    for merge in ("all_to_all", "all_gather"):
        check(
            f"keys_layout_{merge}",
            lambda merge=merge: _same(
                kd.topk_scores(
                    q[r0:r1],
                    keys[k0:k1],
                    k,
                    exclude=my_ex,
                    layout="keys",
                    key_offset=k0,
                    merge=merge,
                ),  # fmt: skip
                want,
                (r0, r1),
            ),
        )

    def empty_shard():  # rank 1 holds no key; default offsets (rank order)
        kk = keys if rank == 0 else keys[:0]
        _same(kd.topk_scores(q[r0:r1], kk, k, exclude=my_ex, layout="keys"), want, (r0, r1))
        big = kdfast.topk_scores(q, keys, n_k + 5, exclude=ex)  # k > the catalog: -1 slots
        _same(kd.topk_scores(q[r0:r1], kk, n_k + 5, exclude=my_ex, layout="keys"), big, (r0, r1))

    check("keys_layout_empty_shard", empty_shard)

    def key_ids():  # shuffled global ids; the tied keys 3, 33, 40, 50, 61 on both ranks
        perm = torch.randperm(n_k, generator=torch.Generator().manual_seed(1))
        ids = perm[: n_k // 2] if rank == 0 else perm[n_k // 2 :]
        got = kd.topk_scores(q[r0:r1], keys[ids], k, exclude=my_ex, layout="keys", key_ids=ids)
        _same(got, want, (r0, r1))
        # a query whose top-1 is the tied key: the lower global id (3) wins whichever rank has it
        probe = keys[50:51].clone()
        top = kd.topk_scores(probe, keys[ids], 5, layout="keys", key_ids=ids)
        assert top.indices[0].tolist() == [3, 33, 40, 50, 61], top.indices

    check("keys_layout_key_ids_ties_across_ranks", key_ids)

    def cosine_bias():
        bias = torch.randn(n_k, generator=torch.Generator().manual_seed(2))
        bias[[3, 40, 61, 33, 50]] = 0.5
        w = kdfast.topk_scores(q, keys, k, exclude=ex, score="cosine", key_bias=bias)
        got = kd.topk_scores(
            q[r0:r1], keys[k0:k1], k, exclude=my_ex, layout="keys", key_offset=k0,
            score="cosine", key_bias=bias[k0:k1],
        )  # fmt: skip
        _same(got, w, (r0, r1))

    check("keys_layout_cosine_bias", cosine_bias)

    def item_side():  # IR-RRD: each item's top users, users sharded as the keys
        t_ex = kdfast.transpose_csr(ex, n_k, n_q)
        w = kdfast.topk_scores(keys, q, k, exclude=t_ex)
        i0, i1 = kd.block_range(n_k, rank, world)
        u0, u1 = r0, r1
        got = kd.topk_scores(
            keys[i0:i1], q[u0:u1], k, exclude=select_rows(*t_ex, torch.arange(i0, i1)),
            layout="keys", key_offset=u0,
        )  # fmt: skip
        _same(got, w, (i0, i1))
        got = kd.topk_scores(keys[i0:i1], q, k, exclude=select_rows(*t_ex, torch.arange(i0, i1)))
        _same(got, w, (i0, i1))

    check("item_side_roles_swapped", item_side)

    split = kdfast.data.random_split(
        kdfast.data.synthetic(150, 90, mean_interactions=12, seed=3), seed=0
    )
    gen = torch.Generator().manual_seed(4)
    ue, ie = (
        torch.randn(split.n_users, 8, generator=gen),
        torch.randn(split.n_items, 8, generator=gen),
    )
    ks = (5, 10, 20)

    def close(got, want):
        assert list(got) == list(want)
        for n in want:
            assert got[n] == pytest.approx(want[n], rel=1e-12, abs=1e-15), (n, got[n], want[n])

    def eval_queries():
        for part in ("valid", "test"):
            want = kdfast.metrics.evaluate(ue, ie, split, part, ks=ks)
            close(kd.evaluate(ue, ie, split, part, ks=ks, batch=7), want)

    def eval_keys():
        c = split.n_items // 3
        j0, j1 = (0, c) if rank == 0 else (c, split.n_items)
        want = kdfast.metrics.evaluate(ue, ie, split, "test", ks=ks)
        close(kd.evaluate(ue, ie[j0:j1], split, "test", ks=ks, layout="keys", batch=16), want)
        want = kdfast.metrics.evaluate(ue, ie, split, "valid", ks=ks, valid_excludes_test=True)
        got = kd.evaluate(
            ue, ie[j0:j1], split, "valid", ks=ks, layout="keys", item_offset=j0,
            valid_excludes_test=True,
        )  # fmt: skip
        close(got, want)

    check("evaluate_queries_layout", eval_queries)
    check("evaluate_keys_layout", eval_keys)

    def writer():
        path = os.path.join(out_dir, "shards")
        w = kd.ShardWriter(path, rank, world)
        vals = w.array("values", r0, r1 - r0, n_q, k, np.float32)
        idx = w.array("indices", r0, r1 - r0, n_q, k, np.int64)
        got = kd.topk_scores(q[r0:r1], keys, k, exclude=my_ex)
        vals[:], idx[:] = got.values.numpy(), got.indices.numpy()
        w.finish()
        r = kd.load_rankings(path)
        assert np.array_equal(np.asarray(r["indices"]), want[1].numpy())
        assert np.array_equal(np.asarray(r["values"]), want[0].numpy())
        rows = np.array([n_q - 1, 0, r1 - 1, r0])
        assert np.array_equal(r["indices"][rows], want[1].numpy()[rows])
        assert np.array_equal(r["indices"][3 : n_q - 2, 1], want[1].numpy()[3 : n_q - 2, 1])
        assert r["values"][-1].shape == (k,)

    check("shard_writer_roundtrip", writer)

    def errors():
        cases = [
            (lambda: kd.topk_scores(q[r0:r1], keys, k + rank), "k: the ranks disagree"),
            (
                lambda: kd.topk_scores(q[r0:r1, : 8 - 2 * rank], keys[:, : 8 - 2 * rank], k),
                "ranks disagree on d",
            ),
            (lambda: kd.topk_scores(q[r0:r1], keys[: n_k - rank], k), "must hold all keys"),
            (
                lambda: kd.topk_scores(q[r0:r1], keys[:10], k, layout="keys", key_offset=5 * rank),
                "overlap",
            ),
            (
                lambda: kd.topk_scores(
                    q[r0:r1],
                    keys[:10],
                    k,
                    layout="keys",
                    **({"key_ids": torch.arange(10, 20)} if rank else {"key_offset": 0}),
                ),  # fmt: skip
                "every rank must give the same one",
            ),
            (
                lambda: kd.topk_scores(q[r0:r1], keys, k, layout="bogus" if rank else "keys"),
                "rank 1 of 2 failed" if rank == 0 else r"on this rank \(1\)",
            ),
        ]
        for fn, text in cases:
            with pytest.raises(ValueError, match=text):
                fn()
        bad = (my_ex[0], my_ex[1] + (n_k if rank == 1 else 0))  # rank 1's ids out of range
        with pytest.raises(ValueError, match=r"rank 1 of 2 failed|on this rank \(1\)") as info:
            kd.topk_scores(q[r0:r1], keys[k0:k1], k, exclude=bad, layout="keys", key_offset=k0)
        assert "exclude" in str(info.value)
        # the group still works after the errors
        _same(kd.topk_scores(q[r0:r1], keys, k, exclude=my_ex), want, (r0, r1))

    check("errors_disagree", errors)
    _save(out_dir, rank, results)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def equality_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_eq")
    codes = _spawn(_equality_worker, tmp)
    assert codes == [0, 0], f"exit codes {codes}"
    return [_load(str(tmp), r) for r in range(2)]


@pytest.mark.parametrize("name", CHECKS)
def test_sharded_equals_one_process(equality_results, name):
    for rank, results in enumerate(equality_results):
        assert results.get(name, "not run") is None, f"rank {rank}:\n{results.get(name)}"


# -------------------------------------------------------------------------------------- failures
def _failure_worker(rank, world, init_file, out_dir):
    """1: rank 1's call raises inside (injected fault): every rank raises at once. 2: rank 1 never
    makes the call (alive, stuck elsewhere): rank 0 raises DistributedError after the timeout.
    Processes end with os._exit (a group that timed out is not torn down cleanly)."""
    _init(rank, world, init_file, timeout_s=TIMEOUT_S)
    from kdfast.distributed import topk as dtopk

    out = {}
    q, keys, _ = _data()
    if rank == 1:
        real = dtopk._partial

        def broken(*a, **kw):
            raise RuntimeError("injected fault in the local top-k")

        dtopk._partial = broken
    t0 = time.monotonic()
    try:
        kd.topk_scores(q[:5], keys[:30] if rank == 0 else keys[30:], 4, layout="keys")
        out["raised"] = None
    except Exception as exc:  # noqa: BLE001
        out["raised"] = (type(exc).__name__, str(exc))
    out["seconds_1"] = time.monotonic() - t0
    if rank == 1:
        dtopk._partial = real
        _save(out_dir, rank, out)
        # never joins the next call; stays alive until rank 0 has reported
        deadline = time.monotonic() + HANG_GUARD_S
        while _load(out_dir, 0) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(0)
    t0 = time.monotonic()
    try:
        kd.topk_scores(q[:5], keys[:30], 4, layout="keys")
        out["timeout"] = None
    except Exception as exc:  # noqa: BLE001
        out["timeout"] = (type(exc).__name__, str(exc))
    out["seconds_2"] = time.monotonic() - t0
    _save(out_dir, rank, out)
    os._exit(0)


def test_failing_rank_makes_every_rank_raise(tmp_path):
    codes = _spawn(_failure_worker, tmp_path)
    assert codes == [0, 0], f"exit codes {codes}"
    r0, r1 = _load(str(tmp_path), 0), _load(str(tmp_path), 1)
    # 1. the raising rank and the other one both raise, naming the fault and the rank
    assert r1["raised"][0] == "DistributedError" and "injected fault" in r1["raised"][1]
    assert "on this rank (1)" in r1["raised"][1]
    assert r0["raised"][0] == "DistributedError" and "rank 1 of 2 failed" in r0["raised"][1]
    assert "injected fault" in r0["raised"][1]
    # 2. a rank that never calls: the other raises once the group's timeout has passed (the hang
    # guard of _spawn would have failed the test otherwise)
    assert r0["timeout"][0] == "DistributedError", r0["timeout"]
    assert f"timeout is {TIMEOUT_S} s" in r0["timeout"][1]


def test_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        kd.topk_scores(torch.randn(3, 4), torch.randn(5, 4), 2)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        kd.init("gloo", timeout_s=0)


def test_ranking_pickles():
    r = kd.Ranking(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.int64), 5, 9)
    back = pickle.loads(pickle.dumps(r))
    assert (back.row_start, back.n_rows, back.rows) == (5, 9, range(5, 7))
    assert torch.equal(back.indices, r.indices) and torch.equal(back.values, r.values)


def test_load_rankings_errors(tmp_path):
    with pytest.raises(ValueError, match="no index.json"):
        kd.load_rankings(tmp_path)
    with pytest.raises(ValueError, match="rank must be in"):
        kd.ShardWriter(tmp_path / "x", 2, 2)


# ---------------------------------------------------------------------------- kdfast topk, torchrun
def test_cli_topk_under_torchrun_writes_shards(tmp_path):
    q, keys, ex = _data(n_q=23)
    np.save(tmp_path / "q.npy", q.numpy())
    np.save(tmp_path / "k.npy", keys.numpy())
    np.savez(tmp_path / "x.npz", indptr=ex[0].numpy(), indices=ex[1].numpy())
    args = ["--queries", str(tmp_path / "q.npy"), "--keys", str(tmp_path / "k.npy"), "-k", "7",
            "--exclude", str(tmp_path / "x.npz"), "--item-side", "--batch", "5",
            "--quiet"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "kdfast.cli", "topk", *args, "--layout", "keys", "--out", str(tmp_path / "sh")],
        capture_output=True, text=True, env=env, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    from kdfast.cli import main

    assert main(["topk", *args, "--out", str(tmp_path / "one.npz")]) == 0
    one = np.load(tmp_path / "one.npz")
    got = kd.load_rankings(tmp_path / "sh")
    assert sorted(got) == sorted(one.files) == ["indices", "item_indices", "item_values", "values"]
    for name in one.files:
        assert np.array_equal(np.asarray(got[name]), one[name]), name
        assert len(got[name].shards) == 2
    idx = (tmp_path / "sh" / "index.json").read_text()
    assert "values.rank00001-of-00002.npy" in idx
