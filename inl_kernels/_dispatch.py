"""The one place that maps a public op to a backend.

Every backend lives in its own package (`inl_kernels/reference`, `inl_kernels/triton`,
`inl_kernels/cpu`, `inl_kernels/cuda`) with one module per op, named after the op. A module
defines a function with the op's name and may define `supports(*args)`, which returns None when
it can run those arguments and otherwise the reason it cannot. A backend package may define
`unavailable_reason()`, which returns None when the backend can run on this machine at all.

The table of (backend, op) -> (function, supports) is built once, when inl_kernels is imported,
so choosing a backend is a few dict lookups and `supports()` calls on metadata: nothing on the
call path imports, reads the environment or touches tensor values, which keeps the public ops
traceable by torch.compile.

`backend="auto"` takes, for the inputs' device, the first backend in `AUTO_ORDER` that is
available, implements the op and supports the arguments; the reference always can. One
exception, measured: while torch.compile traces on a CPU, decode-sized calls take the reference,
which inductor fuses (COMPILE_FUSE_ROWS). A backend asked for by name that cannot run raises an
error that says why.
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Callable, NamedTuple, Optional

import torch

# every backend, declared once (inl_llm's config choices derive from it)
BACKENDS = ("reference", "triton", "cpu", "cuda")

# op name -> the backends that implement it (each as module inl_kernels.<backend>.<op>)
OPS = {
    "iterate": ("reference", "triton", "cpu", "cuda"),
    "rms_norm": ("reference", "triton", "cpu"),
    "rope": ("reference", "triton", "cpu"),
    "attention": ("reference", "triton", "cpu"),
    "swiglu": ("reference", "triton", "cpu"),
    "linear": ("reference", "cpu"),
    "embedding": ("reference",),
}

# preference of backend="auto" by device type
AUTO_ORDER = {
    "cuda": ("triton", "reference"),
    "cpu": ("cpu", "reference"),
}
# Under torch.compile on a CPU, `auto` runs decode-sized calls (at most this many rows: tokens for
# the iterate, RMSNorm and SwiGLU, queries per sequence for attention) on the reference, which
# inductor fuses into its generated loops: there a call into the extension costs more than the
# work. Measured (2 cores, fp32, generate(compile=True), greedy, side by side): `small` 118 -> 151
# tokens/s, `tiny` 520 -> 804, the same tokens. Eager calls and larger inputs keep the C++ kernels.
COMPILE_FUSE_ROWS = 8
_FUSED_UNDER_COMPILE = ("iterate", "rms_norm", "swiglu", "linear", "attention")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine."""


class _Entry(NamedTuple):
    fn: Callable
    supports: Optional[Callable]


def _package_unavailable(backend: str) -> Optional[str]:
    if backend == "reference":
        return None
    try:
        pkg = importlib.import_module(f"inl_kernels.{backend}")
    except ImportError as e:  # e.g. triton not installed, extension not built
        return f"importing inl_kernels.{backend} failed: {e}"
    check = getattr(pkg, "unavailable_reason", None)
    return check() if check is not None else None


def _load_entry(backend: str, op: str) -> Optional[_Entry]:
    try:
        module = importlib.import_module(f"inl_kernels.{backend}.{op}")
    except ModuleNotFoundError as e:
        if e.name == f"inl_kernels.{backend}.{op}":
            return None  # this backend does not implement the op (yet)
        raise
    return _Entry(getattr(module, op), getattr(module, "supports", None))


def _build():
    unavailable = {b: _package_unavailable(b) for b in BACKENDS}
    table = {}
    for op, names in OPS.items():
        for backend in names:
            if unavailable[backend] is None:
                table[(backend, op)] = _load_entry(backend, op)
    return unavailable, table


_UNAVAILABLE, _TABLE = _build()
# the Triton kernels run CPU tensors only through the interpreter, which is chosen at import
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> list[str]:
    """The backends this machine can run, best first for CUDA, then CPU."""
    return [b for b in ("triton", "cuda", "cpu", "reference") if _UNAVAILABLE[b] is None]


def implements(backend: str, op: str) -> bool:
    """Whether `backend` is available here and has a kernel for `op`."""
    return _TABLE.get((backend, op)) is not None


def _device_mismatch(backend: str, device_type: str) -> Optional[str]:
    if backend == "cpu" and device_type != "cpu":
        return f"the cpu backend runs CPU tensors, got {device_type} tensors"
    if backend == "cuda" and device_type != "cuda":
        return f"the cuda backend runs CUDA tensors, got {device_type} tensors"
    if backend == "triton" and device_type != "cuda" and not _INTERPRETING:
        return (f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got {device_type} tensors")
    return None


def _transform_reason() -> Optional[str]:
    """Why a fused op cannot run under the autograd transform in use, or None: its registered
    ops carry a reverse-mode backward only, so forward-mode AD (torch.autograd.forward_ad,
    torch.func.jvp) would see no tangent through them (a zero one, silently) and the functorch
    transforms (torch.func.grad, vmap, ...) refuse them. Such calls run on the reference, whose
    aten ops have every formula. Not while torch.compile traces (its own machinery is no user
    transform)."""
    if torch.compiler.is_compiling():
        return None
    if torch.autograd.forward_ad._current_level >= 0:
        return "forward-mode AD is on, and the fused ops register only a reverse-mode backward"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform is active, and the fused ops register only a reverse-mode backward"
    return None


def _why_not(backend: str, op: str, device_type: str, args) -> Optional[str]:
    reason = _UNAVAILABLE[backend]
    if reason is not None:
        return reason
    entry = _TABLE.get((backend, op))
    if entry is None:
        return f"the {backend} backend has no {op} kernel"
    reason = _device_mismatch(backend, device_type)
    if reason is not None:
        return reason
    if backend != "reference":
        reason = _transform_reason()
        if reason is not None:
            return reason
    return entry.supports(*args) if entry.supports is not None else None


def _fuses_under_compile(op: str, device_type: str, args) -> bool:
    """Whether `auto` should hand this call to inductor (the reference) rather than the C++
    kernel: on a CPU, while torch.compile traces, for decode-sized inputs (COMPILE_FUSE_ROWS).
    A symbolic size (dynamic shapes) keeps the kernel: no guard is added for it."""
    if device_type != "cpu" or not torch.compiler.is_compiling() or op not in _FUSED_UNDER_COMPILE:
        return False
    x = args[0]
    rows = x.shape[-2] if op == "attention" else (x.shape[0] if op == "iterate" else math.prod(x.shape[:-1]))
    return isinstance(rows, int) and rows <= COMPILE_FUSE_ROWS


def resolve(op: str, backend: str, device_type: str, *args) -> Callable:
    """Returns the function that runs `op` for these (already validated) arguments."""
    if backend == "auto" and _fuses_under_compile(op, device_type, args):
        return _TABLE[("reference", op)].fn
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ()) + ("reference",):
            if _why_not(name, op, device_type, args) is None:
                return _TABLE[(name, op)].fn
        raise AssertionError("unreachable: the reference runs everything")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    reason = _UNAVAILABLE[backend]
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is not available on this machine: {reason}")
    reason = _why_not(backend, op, device_type, args)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot run this {op}: {reason}")
    return _TABLE[(backend, op)].fn


def preferred(backend: str, op: str) -> str:
    """The backend a module configured with `backend` uses for `op`: that backend where it has a
    kernel for the op, "auto" for the ops it has none for (a model built with backend="cpu" runs
    the C++ iterate and RMSNorm and lets auto pick attention, swiglu and the embedding)."""
    if backend == "auto" or backend not in BACKENDS or implements(backend, op):
        return backend
    return "auto"
