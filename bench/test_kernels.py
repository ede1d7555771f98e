"""The ops' benchmark cases and providers (bench/ops/*.py) under pytest-benchmark, on the GPU when
there is one, else on the CPU (KDFAST_BENCH_DEVICE=cpu|cuda chooses). Not under tests/: the test
suite never collects it. One test per (function, case, provider), grouped per function and case:

    python -m pytest bench/test_kernels.py --benchmark-only -k small --benchmark-save=NAME
    python -m pytest bench/test_kernels.py --benchmark-only -k small --benchmark-compare=0001

(bench/README.md). The provider's warm-up calls (torch.compile's compilation among them) run before
the timed rounds; each round is one call (forward + backward where the provider does both).
"""

from __future__ import annotations

import functools
import importlib
import os
import re

import pytest
import torch

from bench import harness
from bench.ops import OPS

KIND = os.environ.get("KDFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
DEVICE = torch.device(KIND)


def _bench(op, index):
    return importlib.import_module(f"bench.ops.{op}").BENCHES[index]


def _slug(text):
    return re.sub(r"[^A-Za-z0-9.=]+", "_", text).strip("_")


def _params():
    for op in OPS:
        for i, bench in enumerate(importlib.import_module(f"bench.ops.{op}").BENCHES):
            for case in bench.case_names(KIND):
                for p in bench.providers_for(KIND, bench.params(KIND, case)):
                    name = harness.provider_name(p, KIND)
                    yield pytest.param(
                        op, i, case, name, id=f"{_slug(bench.op)}-{case}-{_slug(name)}"
                    )


@functools.lru_cache(maxsize=1)  # the tests of one case follow each other: keep its inputs only
def _inputs(op, index, case):
    bench = _bench(op, index)
    return bench.inputs(bench.params(KIND, case), DEVICE)


@pytest.mark.parametrize("op,index,case,provider", list(_params()))
def test_kernel(benchmark, op, index, case, provider):
    bench = _bench(op, index)
    params = bench.params(KIND, case)
    step = bench.provider(provider, KIND).make(_inputs(op, index, case), params)

    def call():
        out = step()
        harness.sync(DEVICE)
        return out

    benchmark.group = f"{bench.op} {case}: {bench.label(params)}"
    benchmark.extra_info.update(
        op=bench.op,
        case=case,
        shape=bench.label(params),
        provider=provider,
        threads=torch.get_num_threads(),
        scale=step.scale,
    )
    for _ in range(step.warmup):
        call()
    benchmark.pedantic(call, rounds=step.reps, iterations=1)
    harness.clear_grads(step.leaves)
