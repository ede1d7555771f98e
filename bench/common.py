"""Timing and memory helpers shared by the benchmark scripts (GPU: CUDA events; CPU: perf_counter)."""
from __future__ import annotations

import statistics
import time

import torch


def add_row(rows, row):
    """rows.append(row), and the row back: the GPU modules' timings `yield add_row(rows, {...})`, so that the
    runner saves each row as it comes while the function can still look at the rows so far."""
    rows.append(row)
    return row


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, *, warmup=3, reps=20, max_seconds=20.0):
    """Median wall time of fn() in milliseconds (CUDA events on a GPU), after warm-up calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


def peak_extra_mb(fn, device):
    """Peak memory allocated by one call of fn() beyond what was allocated before it (CUDA only; None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all() and not torch.equal(torch.isfinite(out), torch.isfinite(ref)):
        return float("inf")
    mask = torch.isfinite(ref)
    den = ref[mask].norm().item()
    num = (out[mask] - ref[mask]).norm().item()
    return num / den if den > 0 else num


def markdown_table(rows, columns):
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo), else platform.processor()."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_note():
    """'load average (1 min) at the end: X on N CPUs', for result headers (other jobs slow every
    implementation alike, but the reader should know)."""
    import os
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs"


def write_result(path, text):
    """Print a result and, with a path, write it there (creating the folder)."""
    import os
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
