"""The benchmark harness: what every op's benchmark shares.

- Declarations: an op file (bench/ops/<op>.py) lists `Bench`es, one per function benchmarked: its
  cases per device kind ("cpu", "cuda"; the case "smoke" is the GPU run's try-out shape) and its
  `Provider`s, each of which turns a case's inputs into a `Step`: one call to time (forward, or
  forward + backward when it names the leaves).
- Timing and memory: `measure` (CPU perf_counter medians, CUDA events on a GPU, warm-up calls, a
  time cap; peak extra memory: CUDA's allocator peak, or on the CPU the growth of the process's peak
  resident set, which means something in a child process that runs one provider).
- Process isolation: `run_child` runs a command with a timeout, streams its output, ends its process
  group, and reads back the JSON part file it wrote; `stop_on_signals` turns SIGTERM/SIGHUP into
  `Stopped` so that a runner can save its results before it exits.
- Results: `environment` (device, CPU model, GPU name, driver, versions, threads, date, load),
  `device_slug` (the folder name under bench/results/), `markdown_table`, `write_results` (.md +
  .json).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
TAIL_CHARS = 1500  # of a failed child's output, kept as the detail of its failure row
BASELINE = "eager reference"  # the provider every op's speed-ups are taken against


# ------------------------------------------------------------------------------------ declarations
@dataclasses.dataclass
class Step:
    """One call to time. fn() runs it; with leaves, fn() returns a loss and a call is forward +
    backward: the leaves' gradients are cleared, then fn().backward(). The reported time is the
    measured one times `scale` (a step that does part of the case's work, e.g. fewer rows, or a
    floor derived from a rate, says so in its note)."""

    fn: Callable[[], Any]
    leaves: tuple = ()
    scale: float = 1.0
    note: str | Callable[[], str] = ""
    warmup: int = 1
    reps: int = 10
    max_seconds: float = 20.0

    def __call__(self):
        if not self.leaves:
            return self.fn()
        clear_grads(self.leaves)
        out = self.fn()
        out.backward()
        return out.detach()


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation. make(x, p) builds the Step from the case's inputs x and parameters p.
    kinds: the device kinds it runs on; when(p): whether it runs for a case; comparable: whether its
    result is the eager reference's quantity (the CPU runner compares them). The name may hold
    "{backend}" (the kdfast backend of the device kind: cpp, triton)."""

    name: str
    make: Callable[[Any, dict], Step]
    kinds: tuple = ("cpu", "cuda")
    when: Callable[[dict], bool] = lambda p: True
    comparable: bool = True


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmarked function: cases[kind] maps case names to parameters; inputs(p, device) builds
    a case's inputs (a namespace); label(p) is the shape as the tables show it. Speed-ups are taken
    against the provider named BASELINE."""

    op: str
    cases: dict
    inputs: Callable[[dict, torch.device], Any]
    label: Callable[[dict], str]
    providers: tuple

    def case_names(self, kind, which="all"):
        """The cases of a device kind: "smoke" (the GPU run's try-out), "run" (the GPU run's: those
        whose name begins with "large") or "all" (every case but "smoke")."""
        names = [n for n in self.cases.get(kind, {}) if (n == "smoke") == (which == "smoke")]
        return [n for n in names if which != "run" or n.startswith("large")]

    def params(self, kind, case):
        """A case's parameters, with "backend": the kdfast backend of the device kind."""
        return dict(self.cases[kind][case], backend=backend_of(kind))

    def providers_for(self, kind, params):
        return [p for p in self.providers if kind in p.kinds and p.when(params)]

    def provider(self, name, kind):
        for p in self.providers:
            if provider_name(p, kind) == name:
                return p
        raise KeyError(f"{self.op}: no provider {name!r} for {kind}")


def backend_of(kind):
    """The kdfast backend of a device kind."""
    return "triton" if kind == "cuda" else "cpp"


def provider_name(provider, kind):
    return provider.name.format(backend=backend_of(kind))


def clear_grads(tensors):
    for x in tensors:
        x.grad = None


# ------------------------------------------------------------------------------ timing and memory
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _status_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict that gets "peak_MB": the peak memory of the block beyond what was in use when
    it began (CUDA: allocated tensors; CPU: resident set size, None where /proc cannot tell)."""
    device = torch.device(device)
    found = {"peak_MB": None}
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kb("VmRSS") if _reset_rss_peak() else None
    yield found
    sync(device)
    if device.type == "cuda":
        found["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    elif base is not None:
        found["peak_MB"] = (_status_kb("VmHWM") - base) / 1024


def time_ms(fn, device, *, warmup=3, reps=20, max_seconds=20.0):
    """Median wall time of fn() in milliseconds (CUDA events on a GPU), after warm-up calls; stops
    early after max_seconds once it has 3 timings."""
    return _timed(fn, device, warmup, reps, max_seconds)[0]


def _timed(fn, device, warmup, reps, max_seconds):
    """(median ms, calls timed, seconds of the first warm-up call, the last call's result)."""
    device = torch.device(device)
    first_s = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        first_s = time.perf_counter() - t0 if first_s is None else first_s
    times, out = [], None
    start = time.perf_counter()
    for _ in range(reps):
        out = None  # the last result is kept, the others freed before the next call
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return statistics.median(times), len(times), first_s, out


def measure(step, device):
    """Time a Step and take its peak extra memory over the timed calls. Returns (row fields, the
    last call's result): {"ms", "runs", "first_call_s", "peak_MB", "note"}."""
    with peak_memory(device) as mem:
        ms, runs, first_s, out = _timed(step, device, step.warmup, step.reps, step.max_seconds)
    clear_grads(step.leaves)
    note = step.note() if callable(step.note) else step.note
    row = {"ms": ms * step.scale, "runs": runs, "first_call_s": first_s, "peak_MB": mem["peak_MB"]}
    if note:
        row["note"] = note
    return row, out


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 over ref's finite entries; inf where out is not finite in
    the same places as ref (NaN anywhere in out fails)."""
    out, ref = out.double(), ref.double()
    if not torch.equal(torch.isfinite(out), torch.isfinite(ref)):
        return float("inf")
    mask = torch.isfinite(ref)
    den = ref[mask].norm().item()
    num = (out[mask] - ref[mask]).norm().item()
    return num / den if den > 0 else num


def value_and_grads(fn, tensors, go, *, requires=None, dtype=None):
    """fn(*leaves) and the gradients of sum(fn * go) with respect to fresh leaf copies of tensors
    (in dtype when given); None stays None, and a tensor whose `requires` flag is False is passed
    without gradient (its gradient None)."""
    requires = requires or [True] * len(tensors)
    leaves = [
        None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_(bool(r))
        for x, r in zip(tensors, requires)
    ]
    out = fn(*leaves)
    (out * go).sum().backward()
    return out.detach(), [None if x is None else x.grad for x in leaves]


def check_row(op, case, got, want, tol_val, tol_grad):
    """A GPU check's row: got = (value, gradients) against the reference's want = (value,
    gradients), each within its relative tolerance, and every one of them finite (NaN or inf fails).
    """
    (out, grads), (out_r, grads_r) = got, want
    errs = [rel_err(out, out_r)] + [
        rel_err(g, gr) for g, gr in zip(grads, grads_r) if g is not None
    ]
    finite_ok = bool(torch.isfinite(out).all()) and all(
        bool(torch.isfinite(g).all()) for g in grads if g is not None
    )
    ok = finite_ok and errs[0] <= tol_val and all(e <= tol_grad for e in errs[1:])
    detail = f"rel_err value {errs[0]:.2e}, grads " + ", ".join(f"{e:.2e}" for e in errs[1:])
    return {
        "op": op,
        "case": case,
        "ok": ok,
        "detail": detail + ("" if finite_ok else " NON-FINITE"),
    }


def non_finite_row(op, case, fn):
    """A GPU check's row for the documented non-finite rules: fn() -> (got, want), two tensors whose
    NaN and +-inf patterns must be equal and whose finite values must agree (rel. 1e-4)."""
    try:
        got, want = (x.detach().double().cpu() for x in fn())
        same = all(
            torch.equal(f(got), f(want)) for f in (torch.isnan, torch.isposinf, torch.isneginf)
        )
        finite = torch.isfinite(want)
        err = rel_err(got[finite], want[finite]) if bool(finite.any()) else 0.0
        ok, detail = same and err <= 1e-4, f"same non-finite pattern: {same}, rel_err {err:.2e}"
    except Exception as exc:  # noqa: BLE001 - a failed check, not a failed run
        ok, detail = False, one_line(exc)
    return {"op": op, "case": case, "ok": ok, "detail": detail}


def agreement(out, ref):
    """How a provider's result agrees with the baseline's: per tensor of the same shape, the share
    of equal entries (integer tensors) or the largest difference over the finite entries relative
    to the baseline's largest magnitude (floating ones)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    parts = []
    for a, b in zip(outs, refs):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:  # another quantity (e.g. a backend's per-row losses): not comparable
            continue
        if not a.is_floating_point():
            parts.append(f"{(a == b).double().mean().item() * 100:.3f}% equal")
        else:
            a, b = a.double(), b.double()
            fin = torch.isfinite(b)
            if not torch.equal(torch.isfinite(a), fin):
                parts.append("non-finite entries differ")
            else:
                diff = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
                scale = b[fin].abs().max().item() if fin.any() else 0.0
                parts.append(f"rel. diff {diff / scale if scale else diff:.1e}")
    return ", ".join(parts)


def poison_cuda_cache(device, n=1 << 26):
    """Leave a block of NaN in CUDA's caching allocator, so that the next allocations get NaN-filled
    memory and an output element a kernel fails to write shows up as NaN (nothing on the CPU)."""
    if torch.device(device).type == "cuda":
        x = torch.full((n,), float("nan"), device=device)
        del x


@contextlib.contextmanager
def tf32(on):
    """torch.backends.cuda.matmul.allow_tf32 set to `on` inside the block."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def with_tf32(on, fn):
    """fn, called with allow_tf32 set to `on`."""

    def call():
        with tf32(on):
            return fn()

    return call


def floor_step(rate_step, work, what):
    """A floor as a Step: rate_step does `work_per_call` units of something (a copy, a matmul) in
    its measured time; the floor of the case is that time scaled to the case's `work` units."""
    fn, per_call = rate_step
    return Step(fn, scale=work / per_call, warmup=2, reps=10, note=what)


def copy_rate(device):
    """(fn, bytes per call) of a device-to-device copy: the memory floor's yardstick."""
    n = 2**28 if torch.device(device).type == "cuda" else 2**22
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return (lambda: y.copy_(x)), 2 * n * 4


def matmul_rate(device, dtype, allow_tf32):
    """(fn, multiply-adds per call) of a compute-bound square torch.mm: the matmul floor's
    yardstick."""
    n = 8192 if torch.device(device).type == "cuda" else 256
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return with_tf32(allow_tf32, lambda: torch.mm(a, b)), n**3


# ------------------------------------------------------------------------- running the providers
def timing_row(bench, kind, case, provider, device, x=None):
    """Measure one provider on one case in this process: (row, result). An exception (a compile
    failure, an out-of-memory error) is a row with ms NaN and what happened in its note."""
    params = bench.params(kind, case)
    name = provider_name(provider, kind)
    row = {"op": bench.op, "case": case, "shape": bench.label(params), "impl": name}
    try:
        if x is None:
            x = bench.inputs(params, device)
        fields, out = measure(provider.make(x, params), device)
        row.update(fields)
        return row, out if provider.comparable else None
    except Exception as exc:  # noqa: BLE001 - a failure is a result, the run goes on
        row.update(ms=float("nan"), note=f"failed: {one_line(exc)}")
        return row, None
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def run_benches(benches, device, kind, which):
    """Every provider of the cases `which` (see Bench.case_names) of the benches, in this process
    (the GPU run's timings), one row at a time: a generator, so that a runner can save each row as
    it comes."""
    for bench in benches:
        for case in bench.case_names(kind, which):
            params = bench.params(kind, case)
            x = bench.inputs(params, device)
            for provider in bench.providers_for(kind, params):
                yield timing_row(bench, kind, case, provider, device, x)[0]
            del x


def gpu_timings(benches, device, smoke):
    """The GPU run's timings of an op file (bench/gpu.py calls each op's timings(device, smoke)):
    its "large" cases, or its "smoke" cases with --smoke."""
    return run_benches(benches, device, "cuda", "smoke" if smoke else "run")


def add_speedups(rows):
    """Give each row "x_eager": its speed-up over the BASELINE row of its op, case and thread
    count."""
    key = lambda r: (r.get("op"), r.get("case"), r.get("threads"))  # noqa: E731
    base = {key(r): r["ms"] for r in rows if r.get("impl") == BASELINE and _number(r.get("ms"))}
    for r in rows:
        if key(r) in base and _number(r.get("ms")):
            r["x_eager"] = base[key(r)] / r["ms"]
    return rows


def _number(v):
    return isinstance(v, (int, float)) and v == v and v > 0


def one_line(exc, limit=200):
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


# ------------------------------------------------------------------------------ process isolation
class Stopped(BaseException):
    """A termination signal, raised in the main thread; a BaseException like KeyboardInterrupt, so
    that `except Exception` in the benchmarks does not take it for an error of theirs."""

    def __init__(self, signum):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM (an outer timeout) and SIGHUP raise Stopped inside the block."""
    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s]
    old = {s: signal.signal(s, _stop) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def write_file(path, text):
    """Write through a temporary file, so that a process killed meanwhile leaves the old file or the
    new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_file(path, json.dumps(obj, indent=1, default=str))


def exit_with_parent():
    """End this (child) process when its parent is gone (killed outright, without the chance to end
    it), so that it does not hold the GPU; a daemon thread, so it also works while the main thread
    waits on a kernel."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(70)

    threading.Thread(target=watch, daemon=True).start()


def _kill_group(proc):
    """SIGKILL the child's process group (the child and whatever it started: compile workers);
    nothing when the group is gone."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


@dataclasses.dataclass
class ChildResult:
    """What run_child saw: the part file's content (None if unreadable), the status ("ok", "crash",
    "timeout", "stopped"), a sentence saying what happened, the exit code, the seconds, the output's
    tail, and the Stopped/KeyboardInterrupt that came meanwhile (to be raised again by the caller
    once it has saved its results)."""

    part: dict | None
    status: str
    what: str
    rc: int | None
    seconds: float
    tail: str
    stopped: BaseException | None


def run_child(cmd, part_path, timeout, env=None):
    """Run cmd (a child process in a session of its own) for at most timeout seconds, its output
    streamed to our stdout; the child writes {"done": bool, ...} to part_path as it goes. The status
    is "ok" when the part file says done, else what ended it."""
    if os.path.exists(
        part_path
    ):  # a file left by an earlier run in the same folder is not this one's
        os.remove(part_path)
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    tail = collections.deque(maxlen=200)  # last lines, for the failure detail

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out, stopped = False, None
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    except (
        Stopped,
        KeyboardInterrupt,
    ) as exc:  # collect what the child saved, then stop (the caller)
        stopped = exc
    _kill_group(proc)  # on a timeout or a stop the child, otherwise anything it left running
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # stuck in the driver: leave it, the run goes on
        pass
    reader.join(timeout=10)
    if not reader.is_alive():
        proc.stdout.close()
    seconds = time.monotonic() - t0
    part = None
    try:
        with open(part_path) as f:
            part = json.load(f)
    except (OSError, ValueError):
        pass
    if part and part.get("done"):
        status, what = "ok", f"done in {seconds:.0f} s"
    elif stopped:
        status, what = "stopped", f"killed after {seconds:.0f} s: the run was stopped ({stopped!r})"
    elif timed_out:
        status, what = "timeout", f"killed after {seconds:.0f} s (timeout {timeout:.0f} s)"
    else:
        status, what = "crash", f"exit code {proc.returncode} after {seconds:.0f} s"
    return ChildResult(
        part, status, what, proc.returncode, seconds, "".join(tail)[-TAIL_CHARS:], stopped
    )


# -------------------------------------------------------------------------------------- results
def cpu_model():
    """The CPU's model name (from /proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_isa():
    """The vector instruction sets the CPU reports that kdfast's C++ kernels choose between."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return ""
    return ",".join(f for f in ("avx512f", "avx2", "fma") if f in flags)


def _gpu_driver():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return (
            out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        )
    except (OSError, subprocess.SubprocessError):
        return ""


def _git_commit():
    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load_note():
    """'load average (1 min) at the end: X on N CPUs', for result headers (other jobs slow every
    implementation alike, but the reader should know)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs"


def environment(device, threads=None):
    """What a result was measured on: device, CPU model and instruction sets, GPU name and driver,
    CUDA, torch/triton/Python versions, kdfast's commit and backends, threads, date, load."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    import kdfast

    env = {
        "cpu": cpu_model(),
        "cpu_isa": _cpu_isa(),
        "cpus": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "kdfast": f"{kdfast.__version__} ({_git_commit()})",
        "backends": ", ".join(name for name, (ok, _) in kdfast.backends().items() if ok),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": load_note(),
    }
    if device.type == "cuda":
        env.update(
            device=torch.cuda.get_device_name(device), driver=_gpu_driver(), cuda=torch.version.cuda
        )
    else:
        env["device"] = env["cpu"]
    env["slug"] = device_slug(env["device"], None if device.type == "cuda" else env["cpus"])
    return env


def device_slug(name, cpus=None):
    """The folder of a device's results: its name in lower case, words joined by '-', without the
    trademark signs and the words that say nothing ("processor", "cpu"); for a CPU, "-<N>cpu" with
    the number of logical CPUs. "AMD EPYC" with 2 -> "amd-epyc-2cpu"; "NVIDIA H100 80GB HBM3" ->
    "nvidia-h100-80gb-hbm3"."""
    words = re.sub(r"\((r|tm)\)|@.*", " ", name.lower())
    words = [w for w in re.split(r"[^a-z0-9.]+", words) if w and w not in ("processor", "cpu")]
    slug = "-".join(words).replace(".", "_") or "unknown"
    return f"{slug}-{cpus}cpu" if cpus else slug


def env_lines(env):
    """The environment as the header lines of a results file."""
    gpu = f"; driver {env['driver']}, CUDA {env['cuda']}" if "driver" in env else ""
    return [
        f"- device: {env['device']}{gpu}",
        f"- CPU: {env['cpu']} ({env['cpus']} logical CPUs; {env['cpu_isa'] or 'no AVX'}); "
        f"threads: {env['threads']}",
        f"- torch {env['torch']}, triton {env['triton']}, Python {env['python']}; "
        f"kdfast {env['kdfast']} (backends: {env['backends']})",
        f"- date: {env['date']}; {env['load']}",
    ]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(rows, columns):
    """rows (dicts) as a markdown table of the given columns ((key, title) pairs or keys)."""
    cols = [c if isinstance(c, tuple) else (c, c) for c in columns]
    head = "| " + " | ".join(t for _, t in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |\n" for r in rows)
    return head + body


def short_note(note, limit=300):
    """A note on one line and at most `limit` characters (the JSON keeps all of it)."""
    note = " ".join(str(note or "").split())
    return note if len(note) <= limit else note[: limit - 3] + "..."


def write_result(path, text):
    """Print a result and, with a path, write it there (creating the folder)."""
    print(text)
    if path:
        write_file(path, text if text.endswith("\n") else text + "\n")


def write_results(path_md, title, env, rows, columns, intro=(), command=None):
    """Write a results file: title, environment, command, intro lines and the table, to path_md and
    (rows and environment) to the .json beside it. Returns the markdown text."""
    lines = [f"# {title}", "", *env_lines(env)]
    if command:
        lines.append(f"- command: `{command}`")
    lines += list(intro) + [""]
    shown = [dict(r, note=short_note(r.get("note"))) for r in rows]
    text = "\n".join(lines) + "\n" + markdown_table(shown, columns)
    write_file(path_md, text)
    write_json(
        os.path.splitext(path_md)[0] + ".json",
        {"title": title, "env": env, "command": command, "rows": rows},
    )
    return text
