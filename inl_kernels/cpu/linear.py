"""A projection x·weightᵀ + bias on the compiled CPU backend.

Most calls are torch's own `F.linear` (MKL's GEMM: nothing to gain over it at many rows). Up to
ROWS rows of fp32 without a gradient (a decode step) run `inl::cpu_linear_rows` instead
(csrc/cpu/linear.cpp): each output a dot product along its contiguous weight row, each thread
reading its share of the weight front to back. torch's matrix-vector product reads the weights
at ~6–9 GB/s on the 2-core AMD EPYC machines we run on (Zen 3 and Zen 4), this kernel at ~30
(the machine's read rate); the gap was smaller on the Intel Xeon (not measured with this kernel). Its sums run in another order than
MKL's, so these rows differ from F.linear in the last bits (within fp32 rounding:
tests/cpu/test_linear.py); a row's result depends on nothing but its own row, the weight and
the bias — not on the other rows or the thread count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import _PLAIN, eager_direct, needs_grad  # _PLAIN: by type (isinstance(t, Parameter) costs ~15 µs)
from . import _C

ROWS = 4  # the most rows inl::cpu_linear_rows takes (kLinearRows in csrc/cpu/kernels.h)


@torch.library.custom_op("inl::cpu_linear_rows", mutates_args=(), device_types="cpu")
def cpu_linear_rows_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x·weightᵀ + bias of x [..., K] holding 1 to ROWS contiguous fp32 rows, inference only (no
    autograd formula: linear() calls it only when no gradient is wanted)."""
    return _C.linear_rows(x, weight, bias)


@cpu_linear_rows_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _rows_kernel_runs(x, weight, bias) -> bool:
    """Whether these arguments take the matrix-vector kernel: 1 to ROWS rows, fp32 throughout,
    no autocast, no gradient wanted, plain tensors (or, while torch.compile traces, anything but
    a DTensor): a DTensor or another subclass keeps F.linear, whose dispatch it knows."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and 0 < x.numel() <= ROWS * x.shape[-1] and not torch.is_autocast_enabled("cpu")
            and not needs_grad(x, weight, bias)
            and (all(type(t) in _PLAIN for t in (x, weight, bias) if t is not None)
                 or torch.compiler.is_compiling() and not any(_is_dtensor(t) for t in (x, weight, bias))))


def _is_dtensor(t) -> bool:
    """Whether t is a DTensor (the registered op has no sharding rule: F.linear has)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def linear(x, weight, bias=None):
    if not _rows_kernel_runs(x, weight, bias):
        return F.linear(x, weight, bias)
    run = _C.linear_rows if eager_direct(x, weight, bias) else cpu_linear_rows_op
    return _rows(run, x, weight.contiguous(), None if bias is None else bias.contiguous())


def prepared_inference(weight, bias=None):
    """linear(x, weight, bias) for eager inference as a function of x alone, the weight laid
    out once: for a caller that makes many small calls inside `common.direct_calls()`, with
    gradients and autocast off, on weights that do not change while it is used (a decode loop).
    It gives linear()'s bits: the one-call kernel for few fp32 rows, linear() itself otherwise."""
    if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        return lambda x: linear(x, weight, bias)
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()

    def run(x):
        if x.dtype == torch.float32 and 0 < x.numel() <= ROWS * x.shape[-1]:
            return _rows(_C.linear_rows, x, w, b)
        return linear(x, weight, bias)
    return run


def _rows(run, x, weight, bias):
    """The one-call kernel (`run`: the op or its direct function) on x's rows: x [..., K] ->
    [..., O] (the kernel keeps the leading dimensions)."""
    return run(x if x.is_contiguous() else x.contiguous(), weight, bias)
