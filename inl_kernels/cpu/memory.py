"""How the process's C allocator treats the large buffers a CPU forward and backward make.

PyTorch's CPU tensors come from the C library's malloc. glibc's malloc serves a large request
with a fresh mmap (above its mmap threshold) and hands the top of its heap back to the OS once
more than its trim threshold lies free there. A transformer step allocates and frees buffers of
megabytes in every layer (SwiGLU's gate and up of `small` at 1024 tokens are 8 MiB each), so with
the defaults much of that memory goes back to the OS at each free and comes back at the next
allocation as fresh pages, each one zeroed by the kernel on its first touch: measured here
(`small`, 4 × 256 tokens, 2 threads) ~38,000 minor page faults in one eval forward (~150 MiB of
fresh pages) and a forward ~15 % slower than with freed memory kept (~0 faults).

`keep_freed_memory()` asks glibc to keep it (what the field gets by preloading jemalloc or
tcmalloc, as PyTorch's CPU tuning guide advises, without a library to install): requests up to
`mmap_threshold_mib` (glibc's largest, 32 MiB) come from the heap, and freed heap memory goes back
to the OS only when more than `trim_threshold_mib` lies free at its top. The price is the process's
resident memory: it stays near its high-water mark instead of shrinking between steps. It is
process-wide and one-way (glibc cannot be returned to its adaptive defaults), so the library never
does it on its own: the CLI and the benchmarks do (they own their process), a user calls it, or
sets INL_KERNELS_KEEP_FREED_MEMORY=1 to have `import inl_kernels` do it. Elsewhere than glibc
(musl, macOS, Windows) or with another allocator preloaded (LD_PRELOAD: jemalloc, tcmalloc, which
answer mallopt through glibc without using it) it does nothing and says why.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from typing import Optional

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD_MIB = 32  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)

_state = {"applied": None}  # None, or the (mmap, trim) MiB last applied


def _glibc():
    """(libc handle, None) when the process's malloc is glibc's, else (None, the reason)."""
    if not sys.platform.startswith("linux"):
        return None, f"mallopt is glibc's; this is {sys.platform}"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # jemalloc, tcmalloc, mimalloc: glibc's mallopt would answer but do nothing
        return None, f"another allocator is preloaded (LD_PRELOAD={preload})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except (OSError, TypeError) as e:
        return None, f"no C library to load: {e}"
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None, "the C library is not glibc (mallopt is glibc's)"
    return libc, None


def keep_freed_memory(mmap_threshold_mib: int = MAX_MMAP_THRESHOLD_MIB, trim_threshold_mib: int = 1024) -> bool:
    """Has glibc's malloc keep freed memory for reuse (see the module's docstring). Returns True
    when applied, False where the C library is not glibc (`memory_info()` says why). Raises
    ValueError for a threshold out of range, before changing anything."""
    for name, value, top in (("mmap_threshold_mib", mmap_threshold_mib, MAX_MMAP_THRESHOLD_MIB),
                             ("trim_threshold_mib", trim_threshold_mib, 2047)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= top:
            raise ValueError(f"{name} must be an int in 1..{top}, got {value!r}")
    libc, reason = _glibc()
    if libc is None:
        _state["reason"] = reason
        return False
    mib = 1 << 20
    # the trim threshold first: with the mmap threshold set, glibc stops adapting both
    if not libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold_mib * mib)):
        raise RuntimeError("mallopt(M_TRIM_THRESHOLD) failed")
    if not libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold_mib * mib)):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    _state["applied"] = (mmap_threshold_mib, trim_threshold_mib)
    return True


def keep_unless_disabled() -> bool:
    """What an entry point that owns its process does (the inl_llm CLI, `python -m
    inl_kernels.profile`): keep_freed_memory() unless INL_KERNELS_KEEP_FREED_MEMORY is set to
    anything but 1 (0 opts out; another value has warned at import and changes nothing)."""
    if _env_setting() not in ("", "1"):
        return False  # 0, or a value the import already warned about: malloc left as it is
    return keep_freed_memory()


def memory_info() -> dict:
    """How this process's malloc treats freed memory: "keep" (with the thresholds, MiB) after
    keep_freed_memory(), else "default" (or "unchanged: <reason>" where it could not apply)."""
    applied = _state["applied"]
    if applied is not None:
        return dict(malloc="keep", mmap_threshold_mib=applied[0], trim_threshold_mib=applied[1])
    reason: Optional[str] = _state.get("reason")
    return dict(malloc=f"unchanged: {reason}" if reason else "default")


def _env_setting() -> str:
    """INL_KERNELS_KEEP_FREED_MEMORY as set ("" when unset)."""
    return os.environ.get("INL_KERNELS_KEEP_FREED_MEMORY", "").strip()


def _from_environment() -> None:
    """INL_KERNELS_KEEP_FREED_MEMORY=1 applies keep_freed_memory() at import; 0 or unset does not;
    another value warns (naming the variable) and changes nothing: an import does not fail on it."""
    value = _env_setting()
    if value in ("", "0"):
        return
    if value != "1":
        warnings.warn(f"INL_KERNELS_KEEP_FREED_MEMORY must be 0 or 1, got {value!r}: malloc left as it is",
                      stacklevel=2)
        return
    keep_freed_memory()
