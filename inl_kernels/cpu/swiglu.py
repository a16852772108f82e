"""SwiGLU (SPEC §3) on the compiled CPU backend: the three projections are torch matmuls, the
pointwise part runs fused in csrc/cpu/swiglu.cpp.

    swiglu(x) = (silu(g) · u) · w_downᵀ,   g = x·w_gateᵀ, u = x·w_upᵀ, silu(g) = g·σ(g)
    backward of the pointwise part:  du = o·silu(g),  dg = o·u·σ(g)·(1 + g·(1 − σ(g)))

One pass reads g and u and writes the product (two passes and two temporaries in eager PyTorch:
silu, then the multiply), and one pass writes both gradients in the backward (five in eager).
Computed in fp32 for fp32, bf16 and fp16, rounded once to the input dtype. The pointwise part is
the torch.library op `inl::cpu_silu_mul` (its backward `inl::cpu_silu_mul_backward` is the
op's autograd formula), so torch.compile sees one op.

Up to ROWS rows of fp32 without a gradient (a decode step) run whole in one call instead,
`inl::cpu_swiglu_rows`: the three products as matrix-vector products that stream each weight
once (csrc/cpu/rows.h: each thread reads its share of a weight front to back; ~30 GB/s at `small`'s
shape on a 2-core AMD EPYC Zen 4, against ~18 for this kernel's first design, which interleaved four
weight rows) with silu·u between them.
Its sums run in another order than torch's matmul, so those rows differ from the matmul path in
the last bits (within fp32 rounding of the reference: tests/cpu/test_swiglu.py); a row's result
does not depend on the other rows or the thread count.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..common import dtype_name, eager_direct, needs_grad
from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS = 4  # the most rows inl::cpu_swiglu_rows takes (kSwigluRows in csrc/cpu/kernels.h)


@torch.library.custom_op("inl::cpu_swiglu_rows", mutates_args=(), device_types="cpu")
def cpu_swiglu_rows_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """The whole SwiGLU of 1 to ROWS contiguous fp32 rows, inference only (no autograd formula:
    swiglu() calls it only when no gradient is wanted)."""
    return _C.swiglu_rows(x, w_gate, w_up, w_down)


@cpu_swiglu_rows_op.register_fake
def _(x, w_gate, w_up, w_down):
    return x.new_empty(x.shape[0], w_down.shape[0])


@torch.library.custom_op("inl::cpu_silu_mul", mutates_args=(), device_types="cpu")
def cpu_silu_mul_op(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate)·up, element by element (gate, up contiguous, one shape and dtype)."""
    return _C.swiglu_forward(gate, up)


@cpu_silu_mul_op.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("inl::cpu_silu_mul_backward", mutates_args=(), device_types="cpu")
def cpu_silu_mul_backward_op(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(d gate, d up) from the gradient of silu(gate)·up."""
    grad_gate, grad_up = _C.swiglu_backward(grad, gate, up)
    return grad_gate, grad_up


@cpu_silu_mul_backward_op.register_fake
def _(grad, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return cpu_silu_mul_backward_op(grad.contiguous(), gate, up)


cpu_silu_mul_op.register_autograd(_backward, setup_context=_setup_context)


def supports(x, w_gate, w_up, w_down):
    if x.dtype not in _DTYPES:
        return f"the cpu swiglu runs float32, bfloat16 and float16, got {dtype_name(x.dtype)}"
    return None


def swiglu(x, w_gate, w_up, w_down):
    # fp32 master weights under bf16/fp16 activations: the matmuls run in the activations' dtype
    w_gate, w_up, w_down = (w.to(x.dtype) for w in (w_gate, w_up, w_down))
    if (x.dtype == torch.float32 and _few_rows(x, w_gate) and not torch.is_autocast_enabled("cpu")
            and not needs_grad(x, w_gate, w_up, w_down)):
        run = _C.swiglu_rows if eager_direct(x, w_gate, w_up, w_down) else cpu_swiglu_rows_op
        return _whole(run, x, tuple(w.contiguous() for w in (w_gate, w_up, w_down)))
    gate, up = x @ w_gate.t(), x @ w_up.t()  # contiguous, in the autocast dtype under autocast
    if up.dtype != gate.dtype:
        up = up.to(gate.dtype)
    gate, up = gate.contiguous(), up.contiguous()
    # eager inference calls the op's own function, without its dispatch, and writes the product
    # over gate, which nothing else holds (no fresh buffer of N × F: ~3 % of small's prefill)
    hidden = _C.swiglu_forward(gate, up, gate) if eager_direct(x, w_gate, w_up) else cpu_silu_mul_op(gate, up)
    return hidden @ w_down.t()


def prepared_inference(w_gate, w_up, w_down, dtype):
    """swiglu(x, w_gate, w_up, w_down) for eager inference on `dtype` activations as a function of
    x alone, the weights cast and laid out once: for a caller that makes many small calls inside
    `common.direct_calls()`, with gradients and autocast off, on weights that do not change while
    it is used (a decode loop). Few fp32 rows run the one-call kernel as swiglu() does; anything
    else runs swiglu() itself."""
    if dtype != torch.float32:
        return lambda x: swiglu(x, w_gate, w_up, w_down)
    weights = tuple(w.to(dtype).contiguous() for w in (w_gate, w_up, w_down))

    def run(x):
        return _whole(_C.swiglu_rows, x, weights) if _few_rows(x, w_gate) else swiglu(x, w_gate, w_up, w_down)
    return run


def _few_rows(x, w_gate) -> bool:
    """Whether x's rows are few enough for the one-call kernel (which needs a hidden layer: with
    F = 0 the matmul path gives the zeros)."""
    return 0 < x.numel() <= ROWS * x.shape[-1] and w_gate.shape[0] > 0


def _whole(run, x, weights):
    """The one-call kernel (`run`: the op or its direct function) on x's rows, in x's shape."""
    return run(x.reshape(-1, x.shape[-1]).contiguous(), *weights).view(x.shape)
