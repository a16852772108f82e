"""Triton kernels, one module per op. Runs on CUDA tensors, or on CPU tensors through the
Triton interpreter (TRITON_INTERPRET=1, which tests use)."""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason():
    if torch.cuda.is_available() or interpreting():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels through the CPU interpreter)"
