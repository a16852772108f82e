"""The pointwise part of SwiGLU (SPEC §3) in Triton, forward and backward, and the
autograd.Function that launches it; the three projections are torch matmuls (cuBLAS).

    forward:   h = silu(g)·u = g·σ(g)·u,      g = x·w_gateᵀ, u = x·w_upᵀ
    backward:  du = dh·silu(g),  dg = dh·u·σ(g)·(1 + g·(1 − σ(g)))

One kernel reads g and u once and writes h (eager PyTorch: silu, then a multiply); one kernel
reads g, u, dh once and writes dg and du. Math in fp32 (fp64 for fp64, which only the
interpreter runs), rounded once to the activations' dtype. The pointwise part is the
torch.library op `inl::triton_silu_mul` (torch.library.triton_op, so torch.compile traces into
the kernel), its backward `inl::triton_silu_mul_backward` the op's autograd formula.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

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


@torch.library.triton_op("inl::triton_silu_mul", mutates_args=())
def triton_silu_mul_op(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate)·up, element by element (gate, up contiguous, one shape and dtype)."""
    h = torch.empty_like(gate)
    n = gate.numel()
    if n:
        wrap_triton(_swiglu_forward)[(triton.cdiv(n, BLOCK),)](gate, up, h, n, BLOCK=BLOCK, ACC=_acc(gate.dtype),
                                                             num_warps=4)
    return h


@torch.library.triton_op("inl::triton_silu_mul_backward", mutates_args=())
def triton_silu_mul_backward_op(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(d gate, d up) from the gradient dh of silu(gate)·up."""
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        wrap_triton(_swiglu_backward)[(triton.cdiv(n, BLOCK),)](gate, up, dh, dg, du, n, BLOCK=BLOCK,
                                                               ACC=_acc(gate.dtype), num_warps=4)
    return dg, du


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    gate, up = ctx.saved_tensors
    return triton_silu_mul_backward_op(dh.contiguous(), gate, up)


triton_silu_mul_op.register_autograd(_backward, setup_context=_setup_context)


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
    return triton_silu_mul_op(gate.contiguous(), up.contiguous()) @ w_down.t()
