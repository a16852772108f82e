"""Rotary position embedding (SPEC §3, rotate-half) on the compiled CPU backend, csrc/cpu/rope.cpp:
q and k in one call, forward and backward.

    out = cat(x1·c − x2·s, x2·c + x1·s),   x1 = x[..., :D/2], x2 = x[..., D/2:]

with c, s the table rows of each position. The rotation is orthogonal, so the gradient is the
rotation by −θ: the backward is the same kernel with `inverse`. Computed in fp32 for fp32, bf16
and fp16 and rounded once to the input dtype, as the reference rounds its rotation; the
products may be fused (FMA), so a value can differ from the reference's by about an fp32 ulp of
|x| before that rounding (absolute: under cancellation, many ulps of the result), and a bf16/fp16
value then by one of its ulps. Positions are one per sequence index ([S]) or, for a left-padded batch, one per
row and index ([B, S]); the attention op (cpu/attention.py) rotates through this too.

Registered as the torch.library op `inl::cpu_rope` (its own autograd formula), so
torch.compile sees one op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..common import dtype_name, eager_direct
from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("inl::cpu_rope", mutates_args=(), device_types="cpu")
def cpu_rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_pos: Tensor, k_pos: Tensor,
                inverse: bool) -> tuple[Tensor, Tensor]:
    """(q, k) rotated at positions q_pos, k_pos ([S] each, or [B, S] each), new contiguous
    tensors; `inverse` rotates by −θ (the gradient)."""
    q_out, k_out = _C.rope_forward(q, k, cos, sin, q_pos, k_pos, inverse)
    return q_out, k_out


@cpu_rope_op.register_fake
def _(q, k, cos, sin, q_pos, k_pos, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    _q, _k, cos, sin, q_pos, k_pos, inverse = inputs
    ctx.save_for_backward(cos, sin, q_pos, k_pos)
    ctx.inverse = inverse


def _backward(ctx, grad_q, grad_k):
    cos, sin, q_pos, k_pos = ctx.saved_tensors
    gq, gk = cpu_rope_op(_unit_last(grad_q), _unit_last(grad_k), cos, sin, q_pos, k_pos, not ctx.inverse)
    return gq, gk, None, None, None, None, None


cpu_rope_op.register_autograd(_backward, setup_context=_setup_context)


def _unit_last(t: Tensor) -> Tensor:
    if t.numel() == 0:  # .contiguous() keeps an empty tensor's strides, which the kernel refuses
        return t.new_empty(t.shape)
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def tables_supported(q: Tensor, cos: Tensor, sin: Tensor) -> Optional[str]:
    """Why the kernel cannot rotate q (and a k of its dtype) with these tables, or None."""
    if q.dtype not in _DTYPES:
        return f"the cpu rope runs float32, bfloat16 and float16, got {dtype_name(q.dtype)}"
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return f"the cpu rope reads float32 cos/sin tables, got {dtype_name(cos.dtype)}"
    if cos.requires_grad or sin.requires_grad:
        return "the kernel gives no gradient to cos/sin (they are fixed tables)"
    return None


def supports(q, k, cos, sin, position_offset):
    return tables_supported(q, cos, sin)


def rotate_pair(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
    """q and k rotated at positions q_pos and k_pos (int64, [S] each or [B, S] each), in one
    call: the op's own function in eager inference, the op (with its gradient) otherwise."""
    cos, sin = cos.contiguous(), sin.contiguous()
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    if eager_direct(q, k):
        return tuple(_C.rope_forward(q, k, cos, sin, q_pos, k_pos, False))
    return cpu_rope_op(q, k, cos, sin, q_pos, k_pos, False)


def rope(q, k, cos, sin, position_offset):
    """SPEC §3 rope: returns rotated (q, k), new contiguous tensors."""
    positions = torch.arange(position_offset, position_offset + q.shape[2], device=q.device)
    return rotate_pair(q, k, cos, sin, positions, positions)
