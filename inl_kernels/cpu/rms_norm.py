"""RMSNorm (SPEC §3) on the compiled CPU backend, csrc/cpu/rms_norm.cpp: statistics in fp32,
the fused residual form rounds x + residual to x's dtype before normalising (like the
reference), weight gradients summed in a fixed order.

Registered as the torch.library ops `inl::cpu_rms_norm` and `inl::cpu_rms_norm_backward` (the
backward is the forward op's autograd formula)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..common import dtype_name, eager_direct
from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("inl::cpu_rms_norm", mutates_args=(), device_types="cpu")
def cpu_rms_norm_op(x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, x + residual (empty without a residual), rstd [rows] fp32)."""
    y, s, rstd = _C.rms_norm_forward(x, weight, eps, residual)
    return y, x.new_empty(0) if s is None else s, rstd


@cpu_rms_norm_op.register_fake
def _(x, weight, eps, residual):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(x.shape) if residual is not None else x.new_empty(0),
            x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("inl::cpu_rms_norm_backward", mutates_args=(), device_types="cpu")
def cpu_rms_norm_backward_op(grad_y: Tensor, grad_s: Optional[Tensor], normed: Tensor, weight: Tensor,
                             rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dweight) in fp32; `normed` is what was normalised (x, or x + residual)."""
    gx, gw = _C.rms_norm_backward(grad_y, grad_s, normed, weight, rstd)
    return gx, gw


@cpu_rms_norm_backward_op.register_fake
def _(grad_y, grad_s, normed, weight, rstd):
    return normed.new_empty(normed.shape, dtype=torch.float32), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, _eps, residual = inputs
    _y, s, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(s if ctx.has_residual else x, weight, rstd)


def _backward(ctx, grad_y, grad_s, _grad_rstd):
    normed, weight, rstd = ctx.saved_tensors
    grad_s = grad_s.contiguous() if ctx.has_residual and grad_s is not None else None
    gx, gw = cpu_rms_norm_backward_op(grad_y.contiguous(), grad_s, normed, weight, rstd)
    gx = gx.to(normed.dtype)
    return gx, gw.to(weight.dtype), None, (gx if ctx.has_residual else None)


cpu_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def supports(x, weight, eps, residual):
    if x.dtype not in _DTYPES:
        return f"the cpu rms_norm runs float32, bfloat16 and float16, got {dtype_name(x.dtype)}"
    return None


def rms_norm(x, weight, eps=1e-6, residual=None):
    # eager inference calls the op's own function, without its dispatch
    run = _C.rms_norm_forward if eager_direct(x, weight, residual) else cpu_rms_norm_op
    y, s, _ = run(x, weight, eps, residual)
    return (y, s) if residual is not None else y
