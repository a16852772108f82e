"""Shared by every benchmark: timing, peak memory, the environment record and the JSON/table
output. Timings are medians of repeated calls after warm-up (CUDA events on a GPU,
perf_counter on a CPU), all taken in one process so ratios compare like with like."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch


def environment() -> dict:
    """What produced a result: device, versions and the command line."""
    env = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
    return env


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device="cuda", warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of `fn()` over `repeat` timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], object], device="cuda") -> Optional[float]:
    """Peak CUDA memory allocated during `fn()` beyond what was allocated before it (MiB);
    None on a CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_json(path: str, name: str, rows: list[dict]) -> None:
    """Writes {"benchmark", "environment", "results"} to `path` (directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": name, "environment": environment(), "results": rows}, f, indent=2)
    print(f"wrote {path}")
