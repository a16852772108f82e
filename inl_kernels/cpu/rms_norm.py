"""RMSNorm (SPEC §3) on the compiled CPU backend, csrc/cpu/rms_norm.cpp: statistics in fp32,
the fused residual form rounds x + residual to x's dtype before normalising (like the
reference), weight gradients summed in a fixed order."""
from __future__ import annotations

import torch

from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(x, weight, eps, residual):
    if x.dtype not in _DTYPES:
        return f"the cpu rms_norm runs float32, bfloat16 and float16, got {str(x.dtype).replace('torch.', '')}"
    return None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        y, s, rstd = _C.rms_norm_forward(x, weight, eps, residual)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(s if ctx.has_residual else x, weight, rstd)
        return (y, s) if ctx.has_residual else y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_s=None):
        normed, weight, rstd = ctx.saved_tensors
        gx, gw = _C.rms_norm_backward(grad_y.contiguous(), None if grad_s is None else grad_s.contiguous(),
                                      normed, weight, rstd)
        gx = gx.to(normed.dtype)
        return gx, gw.to(weight.dtype), None, (gx if ctx.has_residual else None)


def rms_norm(x, weight, eps=1e-6, residual=None):
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return _RMSNorm.apply(x, weight, eps, residual)
    y, s, _ = _C.rms_norm_forward(x, weight, eps, residual)
    return (y, s) if residual is not None else y
