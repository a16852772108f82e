"""The hand-written CUDA backend (csrc/cuda/): a forward of the iterate for decode shapes. Built
into inl_kernels._C only when nvcc and a CUDA build of torch were present at install time;
used only when asked for by name (backend="cuda")."""
from __future__ import annotations

import torch

try:
    from .. import _C
except ImportError as e:
    _C = None
    _import_error = str(e)


def unavailable_reason():
    if _C is None:
        return f"the extension inl_kernels._C is not built ({_import_error})"
    if not getattr(_C, "with_cuda", False):
        return ("inl_kernels._C was built without CUDA (it needs nvcc and a CUDA build of torch at install "
                "time)")
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None
