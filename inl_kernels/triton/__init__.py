"""Triton kernels, one module per op. Runs on CUDA tensors, or on CPU tensors through the
Triton interpreter (TRITON_INTERPRET=1, which tests use)."""
from __future__ import annotations

import functools
import os

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: no query on the hot path)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has unit stride (kernels take the other strides), else a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def unavailable_reason():
    if torch.cuda.is_available() or interpreting():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels through the CPU interpreter)"
