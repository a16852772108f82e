"""SwiGLU (SPEC §3) on the compiled CPU backend: the three projections are torch matmuls, the
pointwise part runs fused in csrc/cpu/swiglu.cpp.

    swiglu(x) = (silu(g) · u) · w_downᵀ,   g = x·w_gateᵀ, u = x·w_upᵀ, silu(g) = g·σ(g)
    backward of the pointwise part:  du = o·silu(g),  dg = o·u·σ(g)·(1 + g·(1 − σ(g)))

One pass reads g and u and writes the product (two passes and two temporaries in eager PyTorch:
silu, then the multiply), and one pass writes both gradients in the backward (five in eager).
Computed in fp32 for fp32, bf16 and fp16, rounded once to the input dtype.
"""
from __future__ import annotations

import torch

from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(x, w_gate, w_up, w_down):
    if x.dtype not in _DTYPES:
        return f"the cpu swiglu runs float32, bfloat16 and float16, got {str(x.dtype).replace('torch.', '')}"
    return None


class _SiluMul(torch.autograd.Function):
    """silu(gate)·up, fused."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _C.swiglu_forward(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = _C.swiglu_backward(grad.contiguous(), gate, up)
        return grad_gate, grad_up


def swiglu(x, w_gate, w_up, w_down):
    # fp32 master weights under bf16/fp16 activations: the matmuls run in the activations' dtype
    w_gate, w_up, w_down = (w.to(x.dtype) for w in (w_gate, w_up, w_down))
    gate, up = x @ w_gate.t(), x @ w_up.t()  # contiguous, in the autocast dtype under autocast
    if up.dtype != gate.dtype:
        up = up.to(gate.dtype)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        hidden = _SiluMul.apply(gate, up)
    else:
        hidden = _C.swiglu_forward(gate, up)
    return hidden @ w_down.t()
