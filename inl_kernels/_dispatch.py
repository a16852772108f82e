"""The one place that maps a public op to a backend.

Every backend lives in its own package (`inl_kernels/reference`, `inl_kernels/triton`,
`inl_kernels/cpu`, `inl_kernels/cuda`) with one module per op, named after the op. A module
defines a function with the op's name and may define `supports(*args, **kwargs)`, which
returns None when it can run those arguments and otherwise the reason it cannot. A backend
package may define `unavailable_reason()`, which returns None when the backend can run on
this machine at all.

`backend="auto"` takes, for the inputs' device, the first backend in `AUTO_ORDER` that is
available, implements the op and supports the arguments; the reference always can. A backend
asked for by name that cannot run raises an error that says why.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Optional

BACKENDS = ("reference", "triton", "cpu", "cuda")

# op name -> the backends that implement it (each as module inl_kernels.<backend>.<op>)
OPS = {
    "iterate": ("reference", "triton", "cpu", "cuda"),
    "rms_norm": ("reference", "triton", "cpu"),
    "rope": ("reference", "triton"),
    "attention": ("reference", "triton", "cpu"),
    "swiglu": ("reference", "triton", "cpu"),
    "embedding": ("reference",),
}

# preference of backend="auto" by device type
AUTO_ORDER = {
    "cuda": ("triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine."""


@functools.lru_cache(maxsize=None)
def _package_unavailable(backend: str) -> Optional[str]:
    if backend == "reference":
        return None
    try:
        pkg = importlib.import_module(f"inl_kernels.{backend}")
    except ImportError as e:  # e.g. triton not installed, extension not built
        return f"importing inl_kernels.{backend} failed: {e}"
    check = getattr(pkg, "unavailable_reason", None)
    return check() if check is not None else None


@functools.lru_cache(maxsize=None)
def _module(backend: str, op: str):
    if op not in OPS or backend not in OPS[op]:
        return None
    try:
        return importlib.import_module(f"inl_kernels.{backend}.{op}")
    except ModuleNotFoundError as e:
        if e.name == f"inl_kernels.{backend}.{op}":
            return None  # this backend does not implement the op (yet)
        raise


def _device_mismatch(backend: str, device_type: str) -> Optional[str]:
    if backend == "cpu" and device_type != "cpu":
        return f"the cpu backend runs CPU tensors, got {device_type} tensors"
    if backend == "cuda" and device_type != "cuda":
        return f"the cuda backend runs CUDA tensors, got {device_type} tensors"
    if backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got {device_type} tensors")
    return None


def backends() -> list[str]:
    """The backends this machine can run, best first for CUDA, then CPU."""
    return [b for b in ("triton", "cuda", "cpu", "reference") if _package_unavailable(b) is None]


def _why_not(backend: str, op: str, device_type: str, args, kwargs) -> Optional[str]:
    reason = _package_unavailable(backend)
    if reason is not None:
        return reason
    module = _module(backend, op)
    if module is None:
        return f"the {backend} backend has no {op} kernel"
    reason = _device_mismatch(backend, device_type)
    if reason is not None:
        return reason
    supports = getattr(module, "supports", None)
    return supports(*args, **kwargs) if supports is not None else None


def resolve(op: str, backend: str, device_type: str, *args, **kwargs) -> Callable:
    """Returns the function that runs `op` for these (already validated) arguments."""
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ()) + ("reference",):
            if name in OPS[op] and _why_not(name, op, device_type, args, kwargs) is None:
                return getattr(_module(name, op), op)
        raise AssertionError("unreachable: the reference runs everything")
    reason = _package_unavailable(backend)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is not available on this machine: {reason}")
    reason = _why_not(backend, op, device_type, args, kwargs)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot run this {op}: {reason}")
    return getattr(_module(backend, op), op)
