"""Shared by every benchmark: timing, peak memory, the environment record and the JSON/table
output. Timings are medians of repeated calls after warm-up (CUDA events on a GPU,
perf_counter on a CPU), all taken in one process so ratios compare like with like."""
from __future__ import annotations

import argparse
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
    from inl_kernels.profile import cpu_model

    env = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_model": cpu_model(),  # what lscpu calls "Model name"
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
        env["gpu"] = torch.cuda.get_device_name()
    path = cpu_path()
    if path is not None:
        env["cpu_path"] = path
        from inl_kernels.cpu import memory_info
        env.update(memory_info())  # whether freed memory was kept (add_malloc_argument)
    # what pins the vector path of torch's own CPU kernels and MKL, when set (see bench_iterate)
    env.update({k: os.environ[k] for k in ("INL_KERNELS_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                            "ATEN_CPU_CAPABILITY") if k in os.environ})
    return env


def add_malloc_argument(parser) -> None:
    """--malloc keep|default: whether the run has glibc keep freed memory (inl_kernels.cpu.
    keep_freed_memory; the default, as the CLI does) or leaves malloc as the process found it."""
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: glibc keeps freed memory for reuse (no page faults on every large "
                             "buffer; inl_kernels.cpu.keep_freed_memory); default: leave malloc alone")


def apply_malloc(args) -> None:
    """Applies the --malloc choice (before anything is timed)."""
    if args.malloc == "keep":
        from inl_kernels.cpu.memory import keep_freed_memory
        keep_freed_memory()


def cpu_path():
    """The vector path the C++ backend runs (avx512, avx2, base), or None without it."""
    import inl_kernels
    if "cpu" not in inl_kernels.backends():
        return None
    from inl_kernels.cpu import info
    return info()["capability"]


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


def interleaved_ms(calls, warmup, repeat, rounds=5, device="cpu") -> list[float]:
    """Median milliseconds of each call, timed in `rounds` rounds that take every call in turn
    (`repeat` timed calls each in all): on a shared machine a slow period then hits every call
    alike, and their ratios hold. On CUDA each call is synchronised before and after."""
    for call in calls:
        for _ in range(warmup):
            call()
    samples = [[] for _ in calls]
    for _ in range(rounds):
        for i, call in enumerate(calls):
            for _ in range(max(1, -(-repeat // rounds))):
                sync(device)
                start = time.perf_counter()
                call()
                sync(device)
                samples[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]


def copy_call(device, mib: int = 512, huge_pages: bool = False):
    """(call, bytes moved) of one device copy of `mib` MiB (read + write); with `huge_pages`, a
    CPU copy between buffers on transparent huge pages (as the weights it judges: bench_model)."""
    n = mib * 2**20 // 4
    # both written first: an untouched CPU buffer reads as the kernel's shared zero page (cache
    # resident), and a copy out of it ran ~15 % faster than a real one on a 2-core AMD EPYC (a
    # torch.sum over it at 184 GB/s against 52 over written memory)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    if huge_pages and src.device.type == "cpu":
        from inl_kernels.cpu.pages import huge_pages as to_huge_pages
        to_huge_pages([src, dst])
    return (lambda: dst.copy_(src)), 2 * n * 4


def copy_bandwidth(device, mib: int = 512, repeat: int = 10, huge_pages: bool = False) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), measured now: the bandwidth
    floor the memory-bound ops are judged against."""
    call, moved = copy_call(device, mib, huge_pages)
    ms = time_fn(call, device=device, warmup=2, repeat=repeat)
    return moved / ms / 1e6


def op_parser(description: str, shape_default=None, shape_help=None) -> argparse.ArgumentParser:
    """The flags every GPU op benchmark takes (`--json`, `--quick`, `--dtype`, `--no-compile`,
    `--repeat`, and `--shape` when the op has one)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here (benchmarks/common.py format)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke run")
    if shape_default is not None:
        p.add_argument("--shape", default=shape_default, help=shape_help)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--repeat", type=int, default=10)
    return p


def op_settings(p: argparse.ArgumentParser, args) -> tuple:
    """(device, dtype, use_compile, warmup, repeat) for an op benchmark. Without a GPU only
    --quick runs: ours then runs through the Triton interpreter, which measures nothing."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        p.error("no GPU: only --quick runs here (ours runs through the Triton interpreter, not a speed measure)")
    dtype = torch.float32 if device == "cpu" else getattr(torch, args.dtype)
    # inductor on a CPU compiles C++ for minutes; the smoke run skips it there
    use_compile = not args.no_compile and not (args.quick and device == "cpu")
    warmup, repeat = (1, 2) if args.quick else (5, args.repeat)
    return device, dtype, use_compile, warmup, repeat


def add_speedups(timed: dict, baseline: str = "ours", column: str = "ours_speedup") -> None:
    """Adds row[column] = row.ms / timed[baseline].ms to every timed row (when the baseline ran)."""
    if baseline in timed:
        for row in timed.values():
            row[column] = row["ms"] / timed[baseline]["ms"]


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
