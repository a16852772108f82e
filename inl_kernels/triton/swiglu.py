"""The pointwise part of SwiGLU (SPEC §3) in Triton, forward and backward, and the
autograd.Function that launches it; the three projections are torch matmuls (cuBLAS).

    forward:   h = silu(g)·u = g·σ(g)·u,      g = x·w_gateᵀ, u = x·w_upᵀ
    backward:  du = dh·silu(g),  dg = dh·u·σ(g)·(1 + g·(1 − σ(g)))

One kernel reads g and u once and writes h (eager PyTorch: silu, then a multiply); one kernel
reads g, u, dh once and writes dg and du. Math in fp32 (fp64 for fp64, which only the
interpreter runs), rounded once to the activations' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

BLOCK = 1024


@triton.jit
def _swiglu_forward(G, U, H, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """h = g·σ(g)·u over BLOCK elements per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=mask, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(H + offs, (g * sig * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(G, U, DH, DG, DU, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """du = dh·g·σ(g),  dg = dh·u·σ(g)·(1 + g·(1 − σ(g))) over BLOCK elements per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=mask, other=0.0).to(ACC)
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DU + offs, (dh * g * sig).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        h = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _swiglu_forward[(triton.cdiv(n, BLOCK),)](gate, up, h, n, BLOCK=BLOCK, ACC=_acc(gate.dtype), num_warps=4)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_backward[(triton.cdiv(n, BLOCK),)](gate, up, dh, dg, du, n, BLOCK=BLOCK, ACC=_acc(gate.dtype),
                                                       num_warps=4)
        return dg, du


def supports(x, w_gate, w_up, w_down):
    if x.dtype == torch.float64 and not interpreting():
        return "float64 runs on the reference (the triton kernels compute in fp32 on a GPU)"
    return None


def swiglu(x, w_gate, w_up, w_down):
    """SPEC §3 swiglu: (silu(x·w_gateᵀ) · (x·w_upᵀ))·w_downᵀ."""
    w_gate, w_up, w_down = (w.to(x.dtype) for w in (w_gate, w_up, w_down))
    gate, up = x @ w_gate.t(), x @ w_up.t()  # contiguous; the autocast dtype under autocast
    if up.dtype != gate.dtype:
        up = up.to(gate.dtype)
    return _SiluMul.apply(gate, up) @ w_down.t()
