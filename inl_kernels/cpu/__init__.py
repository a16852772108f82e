"""The compiled C++ CPU backend (csrc/cpu/, OpenMP across row blocks), one module per op. Its
modules are the only Python that calls inl_kernels._C for CPU tensors.

The kernels are compiled once per instruction set (AVX-512, AVX2 + FMA, the x86-64 baseline) and
one path runs, chosen from the CPU's features at first use or pinned by
INL_KERNELS_CPU_CAPABILITY=avx512|avx2|base: `capability()` names it, `capabilities()` lists
those this machine can run, `set_capability(name)` switches (tests run every path this way).

`keep_freed_memory()` (memory.py) has glibc's malloc keep freed memory for the next step instead
of returning it to the OS and faulting it back in: opt-in, process-wide (the CLI and the
benchmarks call it; INL_KERNELS_KEEP_FREED_MEMORY=1 at import). `huge_pages(model)` (pages.py)
backs a model's weights with transparent huge pages in place: decode's weight stream reads faster.
"""
from __future__ import annotations

from .pages import huge_pages
from .memory import keep_freed_memory, memory_info
from .memory import _from_environment as _malloc_from_environment

_malloc_from_environment()

try:
    from .. import _C
except ImportError as e:  # built without a compiler, or not built yet
    _C = None
    _import_error = str(e)


def _watch_set_num_threads() -> None:
    """torch.set_num_threads(n) also tells the C++ ops' adaptive thread count that n is the
    caller's maximum (csrc/cpu/entry.cpp, `threads()`): by the count alone it cannot tell the
    caller's 1 from the 1 it set itself on a busy machine, and then raised it again."""
    import functools

    import torch
    original = torch.set_num_threads
    if _C is None or getattr(original, "_inl_watched", False):
        return

    @functools.wraps(original)
    def set_num_threads(n):
        original(n)
        _C.threads_set_by_caller(int(n))
    set_num_threads._inl_watched = True
    torch.set_num_threads = set_num_threads


_watch_set_num_threads()


def unavailable_reason():
    if _C is None:
        return (f"the C++ extension inl_kernels._C is not built ({_import_error}); install with a C++ "
                f"compiler present: pip install --no-build-isolation -e .")
    try:
        _C.cpu_capability()
    except RuntimeError as e:  # a pinned path this CPU cannot run, or that the build lacks
        return str(e)
    return None


def capability() -> str:
    """The instruction-set path the CPU ops run: "avx512", "avx2" or "base"."""
    return _C.cpu_capability()


def capabilities() -> list[str]:
    """The paths this build holds that this CPU can run, best first."""
    return list(_C.cpu_capabilities())


def set_capability(name: str) -> None:
    """Runs the CPU ops on path `name` ("auto": the best this CPU runs) from now on; raises
    RuntimeError if this build lacks it or this CPU cannot run it."""
    _C.set_cpu_capability(name)


def info() -> dict:
    """What runs here: the path in use, the runnable and the built paths, the vector width, and
    how malloc treats freed memory (memory_info())."""
    return dict(capability=capability(), capabilities=capabilities(), built=list(_C.cpu_built_capabilities()),
                vector_width=_C.cpu_vector_width(), max_iterations=_C.iterate_max_iterations, **memory_info())
