"""The compiled C++ CPU backend (csrc/cpu/, OpenMP across row blocks), one module per op. Its
modules are the only Python that calls inl_kernels._C for CPU tensors."""
from __future__ import annotations

try:
    from .. import _C
except ImportError as e:  # built without a compiler, or not built yet
    _C = None
    _import_error = str(e)


def unavailable_reason():
    if _C is None:
        return (f"the C++ extension inl_kernels._C is not built ({_import_error}); install with a C++ "
                f"compiler present: pip install --no-build-isolation -e .")
    return None
