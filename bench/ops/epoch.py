"""One training epoch per registered KD method (kdfast.methods.registry), as the trainer runs
it: the per-epoch work (method.start_epoch) and the steps (BPR sum loss + the method's KD loss,
backward, fused Adam), on CiteULike-t's shapes, BPR-MF teacher dim 200 -> student dim 20, batch
1024.

Shared by bench/epoch_floor.py (the CPU table: every method's epoch against its floor) and the GPU
run (bench/gpu.py): there `checks(device, smoke)` trains each method two steps with the Triton
backend and checks that its KD loss is finite and that its gradient reaches the student's tables,
and `timings(device, smoke)` times a short epoch of each method with backend="triton" ("kdfast
(triton)") and backend="torch" ("eager reference"). Methods without a backend option (DE, PHR:
plain torch) and the no-KD epoch get one row, "eager reference". HetComp runs with the teacher's
tables as its one teacher's one checkpoint (its build's default without trajectories).

Data: the synthetic set of CiteULike-t's shape (kdfast.data.synthetic, 5219 users, 25181 items,
about 115k training interactions; smoke: 300 x 700) unless `data` names a loaded dataset;
teacher: random BPR-MF tables N(0, 0.1^2) (the cost of an epoch does not depend on the teacher's
quality). A short epoch times at most `steps` steps after one warm-up step (the GPU run: 40,
smoke 3) and scales the median step to the whole epoch.
"""

from __future__ import annotations

import math
import time

import torch

from kdfast import experiment
from kdfast._core.csr import has_pair, pair_keys, row_ids
from kdfast.data import datasets
from kdfast.methods.registry import METHODS, method_class
from kdfast.train import bpr_loss

TEACHER_DIM, STUDENT_DIM, BATCH = 200, 20, 1024
#: CiteULike-t after the >= 5 interactions filter (docs: SPEC section 1)
CITEULIKE_SHAPE = {"n_users": 5219, "n_items": 25181, "mean_interactions": 24.0}
SMOKE_SHAPE = {"n_users": 300, "n_items": 700, "mean_interactions": 12.0}
#: options the smoke shape needs (its 300 users are fewer than IR-RRD's default N_I = 500)
SMOKE_OPTIONS = {"ir-rrd": {"N_I": 100}}


def load(data: str = "synthetic", smoke: bool = False, seed: int = 0):
    """(dataset, leave-one-out split): `data` as kdfast distill takes it ("citeulike-t" reads
    KDFAST_DATA), or "synthetic" of CiteULike-t's shape (smoke: tiny)."""
    if data == "synthetic":
        ds = datasets.synthetic(**(SMOKE_SHAPE if smoke else CITEULIKE_SHAPE), seed=seed)
        from kdfast.data import make_split

        return ds, make_split(ds, "loo", seed=seed)
    return experiment.load_split(experiment.DataSpec(data=data, protocol="loo"))


def random_teacher(split, device="cpu", seed=0):
    """Random teacher tables [U, 200], [I, 200], N(0, 0.1^2), on `device`."""
    g = torch.Generator().manual_seed(seed)
    tu = torch.randn(split.n_users, TEACHER_DIM, generator=g) * 0.1
    ti = torch.randn(split.n_items, TEACHER_DIM, generator=g) * 0.1
    return tu.to(device), ti.to(device)


def method_names():
    """Every registered method name, in the registry's order."""
    return list(METHODS)


def has_backend_option(name) -> bool:
    cls, _ = method_class(name)
    return "backend" in cls.option_defaults()


class Epoch:
    """One epoch's batches (the trainer's: a permutation of the training pairs, one unobserved
    uniform negative each, batch 1024) for a split, on a device."""

    def __init__(self, split, device="cpu", seed=0, batch=BATCH):
        indptr, items = split.train
        gen = torch.Generator().manual_seed(seed)
        users = row_ids(indptr)
        perm = torch.randperm(items.numel(), generator=gen)
        users, pos = users[perm], items[perm]
        neg = _negatives(users, pair_keys(indptr, items, split.n_items), split.n_items, gen)
        self.users, self.pos, self.neg = (x.to(device) for x in (users, pos, neg))
        self.batch = batch
        self.n_steps = math.ceil(items.numel() / batch)

    def step(self, b):
        sl = slice(b * self.batch, (b + 1) * self.batch)
        return self.users[sl], self.pos[sl], self.neg[sl]


def _negatives(users, keys, n_items, gen):
    neg = torch.randint(0, n_items, (users.numel(),), generator=gen)
    todo = torch.arange(users.numel())
    while todo.numel():
        bad = has_pair(keys, users[todo] * n_items + neg[todo])
        todo = todo[bad]
        neg[todo] = torch.randint(0, n_items, (todo.numel(),), generator=gen)
    return neg


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def build(name, split, tu, ti, backend=None, seed=1, device="cpu", extra=None):
    """(student model, method or None, build seconds) for a registered name ("none": no KD), with
    its registry options updated by `extra`."""
    model = experiment.new_model(
        "bprmf", STUDENT_DIM, split, torch.Generator().manual_seed(seed), device
    )
    if name == "none":
        return model, None, 0.0
    cls, options = method_class(name)
    options.update(extra or {})
    if backend is not None and "backend" in cls.option_defaults():
        options["backend"] = backend
    _sync(device)
    t0 = time.perf_counter()
    method = cls.build(
        tu,
        ti,
        tuple(x.to(device) for x in split.train),
        STUDENT_DIM,
        generator=torch.Generator().manual_seed(seed + 1),
        **options,
    ).to(device)
    _sync(device)
    return model, method, time.perf_counter() - t0


def run_epoch(model, method, epoch: Epoch, steps=None, device="cpu", max_epoch=100, warmup=1):
    """Train one epoch (or its first `steps` steps, after `warmup` untimed ones) the trainer's way.
    Returns {"start_s": method.start_epoch seconds, "step_s": median step seconds, "steps": timed
    steps, "epoch_s": start_s + step_s * the epoch's steps, "kd_loss": the last KD loss,
    "grad_ok": the student's tables got a finite, nonzero gradient from the KD loss alone (checked
    on the first step)}."""
    params = [p for p in model.parameters() if p.requires_grad]
    if method is not None:
        params += [p for p in method.parameters() if p.requires_grad]
    fused = device != "cpu" or all(p.dtype.is_floating_point for p in params)
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-3, fused=fused)
    _sync(device)
    t0 = time.perf_counter()
    if method is not None:
        with torch.no_grad():
            su, si = model.embeddings()
            method.start_epoch(0, max_epoch, su.detach(), si.detach())
    _sync(device)
    start_s = time.perf_counter() - t0
    n = epoch.n_steps if steps is None else min(steps + warmup, epoch.n_steps)
    times, kd_val, grad_ok = [], float("nan"), None
    for b in range(n):
        batch = epoch.step(b)
        _sync(device)
        t0 = time.perf_counter()
        ue, ie = model.embeddings()
        loss = bpr_loss(ue, ie, *batch) if method is None or method.uses_base_loss else 0.0
        if method is not None:
            kd = method(ue, ie, *batch)
            if grad_ok is None:
                g = torch.autograd.grad(kd, [ue, ie], retain_graph=True, allow_unused=True)
                grad_ok = all(x is not None and bool(torch.isfinite(x).all()) for x in g) and any(
                    bool((x != 0).any()) for x in g
                )
            loss = loss + kd
            kd_val = float(kd.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if b >= warmup or steps is None:
            times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2] if times else float("nan")
    return {
        "start_s": start_s,
        "step_s": step_s,
        "steps": len(times),
        "epoch_s": start_s + step_s * epoch.n_steps if steps is not None else start_s + sum(times),
        "kd_loss": kd_val,
        "grad_ok": grad_ok,
    }


# ------------------------------------------------------------------------------------ the GPU run
def _gpu_setup(device, smoke):
    _, split = load("synthetic", smoke=smoke)
    tu, ti = random_teacher(split, device)
    return split, tu, ti, Epoch(split, device)


def checks(device, smoke):
    """Per method, a few Triton-backend steps: KD loss finite and the student's tables reached."""
    split, tu, ti, epoch = _gpu_setup(device, smoke)
    rows = []
    for name in method_names():
        row = {"op": "epoch", "case": name, "ok": False, "detail": ""}
        try:
            extra = SMOKE_OPTIONS.get(name) if smoke else None
            model, method, _ = build(name, split, tu, ti, "triton", device=device, extra=extra)
            r = run_epoch(model, method, epoch, steps=2, device=device, warmup=0)
            row["ok"] = bool(math.isfinite(r["kd_loss"]) and r["grad_ok"])
            row["detail"] = f"kd loss {r['kd_loss']:.6g}, gradient reaches student: {r['grad_ok']}"
        except Exception as exc:  # noqa: BLE001 - a failure is a row
            row["detail"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        rows.append(row)
    return rows


def timings(device, smoke):
    """Per method, a short epoch (start_epoch + the median of `steps` steps, scaled to the epoch's
    steps) with backend="triton" and backend="torch"; rows in bench/gpu.py's format, ms = the
    epoch's milliseconds."""
    split, tu, ti, epoch = _gpu_setup(device, smoke)
    steps = 3 if smoke else 40
    shape = f"U{split.n_users} I{split.n_items} B{BATCH} d{TEACHER_DIM}->{STUDENT_DIM}"
    for name in ["none", *method_names()]:
        impls = [("kdfast (triton)", "triton"), ("eager reference", "torch")]
        if name == "none" or not has_backend_option(name):
            impls = [("eager reference", None)]
        for impl, backend in impls:
            row = {"op": "epoch", "case": name, "shape": shape, "impl": impl, "peak_MB": None}
            try:
                extra = SMOKE_OPTIONS.get(name) if smoke else None
                model, method, setup = build(
                    name, split, tu, ti, backend, device=device, extra=extra
                )
                torch.cuda.reset_peak_memory_stats(device) if device != "cpu" else None
                r = run_epoch(model, method, epoch, steps=steps, device=device)
                row.update(
                    ms=r["epoch_s"] * 1e3,
                    note=f"{r['steps']} steps timed of {epoch.n_steps}, step "
                    f"{r['step_s'] * 1e3:.3g} ms, start_epoch {r['start_s'] * 1e3:.3g} ms, "
                    f"build {setup:.3g} s",
                )
                if device != "cpu":
                    row["peak_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
                del model, method
            except Exception as exc:  # noqa: BLE001
                row.update(ms=float("nan"), note=f"failed: {' '.join(str(exc).split())[:200]}")
            yield row
