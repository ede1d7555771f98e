"""Crashes of the C++ extension that must be results or Python exceptions instead.

Each case calls kdfast._C directly (raw buffers, as the Python glue does) in a child process, so
that a crash (SIGFPE, std::terminate from an exception leaving an OpenMP region, a bad pointer)
fails the test instead of killing pytest. The child prints what it got; the test checks the exit
status and that line.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("kdfast._C", reason="the C++ extension kdfast._C is not built")

import kdfast  # noqa: E402

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kdfast.__file__)))

_PRELUDE = """
import torch
from kdfast import _C
P = lambda t: 0 if t is None else t.data_ptr()
def outcome(f):
    try:
        r = f()
    except Exception as exc:  # the class name and message are what the test compares
        return f"{type(exc).__name__}: {exc}"
    return f"returned {r!r}"
"""


def run_child(code, **env):
    """stdout of a fresh interpreter running code (with _PRELUDE); asserts it exited normally."""
    child_env = {k: v for k, v in os.environ.items() if k != "KDFAST_BACKEND"}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p
    )
    child_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"the child process died (exit status {proc.returncode}; negative: killed by "
        f"that signal)\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
    )
    return proc.stdout.strip().splitlines()


def test_pl_embeddings_zero_item_rows_backward_four_threads():
    # N = 0 item rows, every id padding, B = 256 rows and 4 threads: the scatter's thread split
    # divided by N (SIGFPE). The right result: a [0, d] item gradient and the query gradient (0: no
    # valid entry).
    lines = run_child("""
        B, K, d, N = 256, 5, 8, 0
        q = torch.randn(B, d)
        e = torch.zeros(N, d)
        ri = torch.full((B, K), -1, dtype=torch.int64)
        loss, dr, gq = torch.empty(B), torch.empty(B, K), torch.empty(B, d)
        print(outcome(lambda: _C.pl_emb_forward(P(q), P(e), 0, P(ri), 0, 0, B, K, 0, d, N, B, False,
                                                P(loss), P(dr), 0, 0, P(gq), 4)))
        go = torch.ones(B)
        grad_q, grad_e = torch.full((B, d), 7.0), torch.zeros(N, d)
        grad_q.zero_()
        print(outcome(lambda: _C.pl_emb_backward(P(go), P(q), 0, P(ri), 0, P(dr), 0, 0, P(gq), B, K,
                                                 0, d, N, False, P(grad_q), P(grad_e), 0, 4)))
        print(tuple(grad_e.shape), bool((loss == 0).all()), bool((grad_q == 0).all()))
    """)
    assert lines == ["returned None", "returned None", "(0, 8) True True"]


def test_pl_embeddings_backward_small_team_covers_every_item():
    # 2 threads asked for, 1 granted (OMP_THREAD_LIMIT=1): the 1-3 thread scatter took its item
    # range from the thread number, so the second half of the items got no gradient.
    lines = run_child(
        """
        g = torch.Generator().manual_seed(0)
        B, K, d, N = 128, 6, 4, 50
        q = torch.randn(B, d, generator=g)
        e = torch.randn(N, d, generator=g)
        ri = torch.randint(0, N, (B, K), generator=g)
        loss, dr, gq = torch.empty(B), torch.empty(B, K), torch.empty(B, d)
        _C.pl_emb_forward(P(q), P(e), 0, P(ri), 0, 0, B, K, 0, d, N, B, False, P(loss), P(dr), 0, 0,
                          P(gq), 1)
        go = torch.ones(B)
        grads = []
        for n_threads in (1, 2):
            grad_q, grad_e = torch.zeros(B, d), torch.zeros(N, d)
            _C.pl_emb_backward(P(go), P(q), 0, P(ri), 0, P(dr), 0, 0, P(gq), B, K, 0, d, N, False,
                               P(grad_q), P(grad_e), 0, n_threads)
            grads.append(grad_e)
        print(torch.equal(grads[0], grads[1]), bool((grads[0].abs().sum(1) > 0).all()))
    """,
        OMP_THREAD_LIMIT="1",
    )
    assert lines == ["True True"]


def test_pl_emb_forward_raises_for_bad_ids():
    # pl_emb_forward returned (code, value) for a bad id; it raises ValueError, naming the first bad
    # row's id whatever the thread count (rows 40 and 300 hold bad ids; 4 threads, dynamic
    # schedule).
    lines = run_child("""
        B, K, L, d, N = 400, 3, 2, 4, 10
        q, e, t = torch.randn(B, d), torch.randn(N, d), torch.zeros(B)
        ri = torch.randint(-1, N, (B, K))
        ui = torch.randint(-1, N, (B, L))
        loss = torch.empty(B)
        def call(ri, ui, rows=None, n_rows=B):
            b = B if rows is None else rows.numel()
            return outcome(lambda: _C.pl_emb_forward(P(q), P(e), P(rows), P(ri), P(ui), P(t), b, K,
                                                     L, d, N, n_rows, False, P(loss), 0, 0, 0, 0,
                                                     4))
        print(call(ri, ui))
        bad = ri.clone(); bad[300, 1] = N + 5; bad[40, 2] = -7
        print(call(bad, ui))
        bad = ui.clone(); bad[300, 0] = 99; bad[41, 1] = N
        print(call(ri, bad))
        rows = torch.arange(B); rows[200] = B + 1; rows[350] = -3
        print(call(ri, ui, rows))
    """)
    assert lines == [
        "returned None",
        "ValueError: ranked_idx holds ids outside [0, 10) or -1 (padding): found -7",
        "ValueError: unranked_idx holds ids outside [0, 10) or -1 (padding): found 10",
        "ValueError: rows holds ids outside [0, 400): found 401",
    ]


def test_uniform_excluding_sample_huge_id_range():
    # n_ids = 2**40: each thread allocated a bitmap of 2**40 bits inside the OpenMP region;
    # std::bad_alloc there called std::terminate. Drawing a few ids needs no such buffer.
    lines = run_child("""
        n_ids = 2**40
        out = torch.empty(1, 1, dtype=torch.int64)
        keys, offsets = torch.empty(0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        print(outcome(lambda: _C.uniform_excluding_sample(7, 1, n_ids, 1, P(keys), P(offsets),
                                                          P(out), 2)))
        print(0 <= int(out[0, 0]) < n_ids)
        n_rows, size = 3, 5
        excluded = [[3, 2**39], [], [0, 1, 2**40 - 1]]
        keys = torch.tensor([r * n_ids + i for r, ids in enumerate(excluded) for i in ids],
                            dtype=torch.int64)
        offsets = torch.tensor([0, 2, 2, 5], dtype=torch.int64)
        out = torch.empty(n_rows, size, dtype=torch.int64)
        print(outcome(lambda: _C.uniform_excluding_sample(7, n_rows, n_ids, size, P(keys),
                                                          P(offsets), P(out), 2)))
        ok = all(len(set(row)) == size and not set(row) & set(ex)
                 and all(0 <= i < n_ids for i in row) for row, ex in zip(out.tolist(), excluded))
        print(ok)
    """)
    assert lines == ["returned None", "True", "returned None", "True"]


def test_uniform_excluding_sample_raises_for_bad_keys():
    # It returned -2 - row for keys outside their row (and wrote out of bounds for a negative
    # count).
    lines = run_child("""
        n_rows, n_ids, size = 4, 20, 2
        out = torch.empty(n_rows, size, dtype=torch.int64)
        def call(keys, offsets):
            keys = torch.tensor(keys, dtype=torch.int64)
            offsets = torch.tensor(offsets, dtype=torch.int64)
            return outcome(lambda: _C.uniform_excluding_sample(1, n_rows, n_ids, size, P(keys),
                                                               P(offsets), P(out), 2))
        print(call([1, 20 + 3, 3 * 20 + 19], [0, 1, 2, 2, 3]))
        print(call([1, 20 + 3, 20 + 25, 2 * 20 - 1, 3 * 20 + 1], [0, 1, 3, 4, 5]))
        print(call([1, 2], [0, 2, 1, 1, 2]))
    """)
    assert lines == [
        "returned None",
        "ValueError: excluded_keys holds keys outside row 1 (keys must be row * n_ids + id, "
        "sorted, with per-row counts, as returned by exclusion_keys)",
        "ValueError: excluded_keys holds a negative count for row 1 (counts as returned by "
        "exclusion_keys)",
    ]


def test_rank_discounted_sample_bad_k():
    # k = 0 read the top of an empty heap (SIGSEGV); k > n read past the offsets.
    lines = run_child("""
        out = torch.empty(4, 8, dtype=torch.int64)
        print(outcome(lambda: _C.rank_discounted_sample(1, 4, 10, 0, 2.0, P(out), 2)))
        print(outcome(lambda: _C.rank_discounted_sample(1, 4, 5, 8, 2.0, P(out), 2)))
    """)
    assert lines == [
        "ValueError: rank_discounted_sample: needs n_rows >= 0 and 1 <= k <= n, got n_rows = 4, "
        "n = 10, k = 0",
        "ValueError: rank_discounted_sample: needs n_rows >= 0 and 1 <= k <= n, got n_rows = 4, "
        "n = 5, k = 8",
    ]


def test_topk_non_finite_scores_rank_last_on_every_isa():
    # The public test (tests/test_hostile.py) runs the "auto" variant only. A score that is not
    # finite (NaN, or a float32 dot product that overflowed: +inf, or inf - inf) ranked first (+inf)
    # or was reported as +inf; the rule: it ranks as -inf and is reported as -inf, ties to the lower
    # index, on every instruction-set variant, float32 and float64 (where it is the float32 rounding
    # that overflows), also where the candidate buffers fill up and the thresholds rise (2003 keys,
    # k = 30).
    lines = run_child("""
        import kdfast
        def call(q, keys, k, isa, indptr=None, indices=None):
            n_q, d = q.shape
            if indptr is None:
                indptr = torch.zeros(n_q + 1, dtype=torch.int64)
                indices = torch.zeros(0, dtype=torch.int64)
            v, i = torch.empty(n_q, k), torch.empty(n_q, k, dtype=torch.int64)
            _C.topk_scores(P(q), P(keys), n_q, keys.shape[0], d, k, P(indptr), P(indices), P(v),
                           P(i), q.dtype == torch.float64, 2, isa)
            return v, i
        def reference(q, keys, k, excl=None):
            return kdfast.topk_scores(q, keys, k, exclude=excl, backend="torch")
        big = 3e38
        keys = torch.zeros(40, 32)
        keys[3, :16], keys[3, 16:] = big, -big  # partial sums +inf then inf - inf
        keys[5, :] = big  # +inf
        keys[7, 0] = float("nan")
        keys[9, 0], keys[11, 0] = 1.0, -1.0
        q = torch.ones(2, 32)
        want = [9] + [j for j in range(40) if j not in (3, 5, 7, 9, 11)] + [11, 3, 5, 7]
        g = torch.Generator().manual_seed(0)
        rq = torch.randint(-3, 4, (29, 19), generator=g).float()
        rk = torch.randint(-3, 4, (2003, 19), generator=g).float()
        hit = torch.rand(rk.shape, generator=g) < 0.02
        bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
        pick = bad[torch.randint(0, 3, rk.shape, generator=g)]
        rk = torch.where(hit, pick, rk)
        rk[:300:3] = float("inf")  # many non-finite scores first, before any threshold
        indptr = torch.arange(0, 29 * 7 + 1, 7)
        indices = torch.sort(torch.randint(0, 2003, (29, 7), generator=g), 1).values.reshape(-1)
        for isa in ("avx512", "avx2", "generic"):
            try:
                _C.topk_isa(isa)
            except ValueError:
                # not on this CPU
                print(isa, "float32 True True", isa, "float64 True", isa, "random True True")
                continue
            v, i = call(q, keys, 40, isa)
            ok = i.tolist() == [want] * 2
            ok = ok and bool((v[:, 0] == 1).all() and torch.isneginf(v[:, -3:]).all())
            rv, ri = reference(q, keys, 40)
            print(isa, "float32", ok, torch.equal(v, rv) and torch.equal(i, ri), end=" ")
            v, i = call(q.double(), keys.double(), 40, isa)
            rv, ri = reference(q.double(), keys.double(), 40)
            print(isa, "float64", torch.equal(v, rv) and torch.equal(i, ri), end=" ")
            same = []
            for dtype in (torch.float32, torch.float64):
                v, i = call(rq.to(dtype), rk.to(dtype), 30, isa, indptr, indices)
                rv, ri = reference(rq.to(dtype), rk.to(dtype), 30, (indptr, indices))
                same.append(torch.equal(v, rv) and torch.equal(i, ri))
            print(isa, "random", *same)
    """)
    assert lines == [
        f"{isa} float32 True True {isa} float64 True {isa} random True True"
        for isa in ("avx512", "avx2", "generic")
    ]


_HUGE_SCRATCH = {
    # beyond any address space: rejected before the region (std::length_error -> ValueError)
    "pl_forward K=2**61": (
        "_C.pl_forward(P(x), 0, 0, 0, 2**61, 0, False, P(x), P(x), P(x), 2)",
        "ValueError",
    ),
    "full_catalog D=2**58": (
        "_C.full_catalog_log_tail(P(x), P(x), 1, 1, 2**58, P(ip), P(ip), 5.0, P(x), False, 2)",
        "ValueError",
    ),
    # allocated inside the region and failing there (std::bad_alloc -> MemoryError)
    "pl_forward K=2**55": (
        "_C.pl_forward(P(x), 0, 0, 0, 2**55, 0, False, P(x), P(x), P(x), 2)",
        "MemoryError",
    ),
    "full_catalog D=2**50": (
        "_C.full_catalog_log_tail(P(x), P(x), 1, 1, 2**50, P(ip), P(ip), 5.0, P(x), False, 2)",
        "MemoryError",
    ),
}


@pytest.mark.parametrize("case", sorted(_HUGE_SCRATCH))
def test_scratch_that_cannot_be_allocated(case):
    # Per-thread scratch sized from the arguments is a std::vector built inside the OpenMP region: a
    # std::length_error / std::bad_alloc there called std::terminate. (No row is processed: the
    # buffers are never read.)
    call, expected = _HUGE_SCRATCH[case]
    lines = run_child(f"""
        x = torch.zeros(4)
        ip = torch.zeros(2, dtype=torch.int64)
        print(outcome(lambda: {call}))
    """)
    assert len(lines) == 1 and lines[0].startswith(expected + ": "), lines
