"""Rotary position embedding (rotate-half) in Triton: q and k in one launch, forward and
backward, at any position offset; and the autograd.Function that launches it.

With x1 = x[..., :D/2], x2 = x[..., D/2:] and c, s the table rows of positions
offset … offset+S−1:   out = cat(x1·c − x2·s, x2·c + x1·s).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import interpreting, unit_last


@triton.jit
def _rotate_tile(X, Y, stride_xs, stride_ys, c, s, pos, S, cols,
                 HALF: tl.constexpr, ACC: tl.constexpr):
    """Rotates one head's [BLOCK_S, D] rows: y1 = x1·c − x2·s, y2 = x2·c + x1·s."""
    mask = (pos < S)[:, None] & (cols < HALF)[None, :]
    x_ptrs = X + pos.to(tl.int64)[:, None] * stride_xs + cols[None, :]
    y_ptrs = Y + pos.to(tl.int64)[:, None] * stride_ys + cols[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptrs, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, S, Hq, Hkv, offset,
                 sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s, stride_table,
                 HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, INVERSE: tl.constexpr,
                 ACC: tl.constexpr):
    """Program (s-block, b·(Hq+Hkv) + head) rotates BLOCK_S positions of one q or k head by the
    angles of positions offset + s. INVERSE rotates by −angle (s → −s): the backward, since the
    rotation is orthogonal, dx = R(θ)ᵀ·dy = R(−θ)·dy."""
    pos = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    bh = tl.program_id(1)
    b = bh // (Hq + Hkv)
    h = bh % (Hq + Hkv)
    cols = tl.arange(0, BLOCK_H)
    t_mask = (pos < S)[:, None] & (cols < HALF)[None, :]
    t_ptrs = (offset + pos).to(tl.int64)[:, None] * stride_table + cols[None, :]
    c = tl.load(COS + t_ptrs, mask=t_mask, other=0.0).to(ACC)
    s = tl.load(SIN + t_ptrs, mask=t_mask, other=0.0).to(ACC)
    if INVERSE:
        s = -s
    b64 = b.to(tl.int64)
    if h < Hq:
        _rotate_tile(Q + b64 * sq_b + h * sq_h, QO + b64 * sqo_b + h * sqo_h, sq_s, sqo_s, c, s, pos, S, cols,
                     HALF, ACC)
    else:
        hk = h - Hq
        _rotate_tile(K + b64 * sk_b + hk * sk_h, KO + b64 * sko_b + hk * sko_h, sk_s, sko_s, c, s, pos, S, cols,
                     HALF, ACC)


def _launch(q, k, cos, sin, offset, inverse):
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if qo.numel() == 0 and ko.numel() == 0:
        return qo, ko
    half = D // 2
    block_h = triton.next_power_of_2(max(half, 1))
    block_s = max(1, min(64, triton.next_power_of_2(S), 4096 // block_h))
    grid = (triton.cdiv(S, block_s), B * (Hq + Hkv))
    wrap_triton(_rope_kernel)[grid](
        q, k, qo, ko, cos, sin, S, Hq, Hkv, offset,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), cos.stride(0),
        HALF=half, BLOCK_S=block_s, BLOCK_H=block_h, INVERSE=inverse,
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32, num_warps=4)
    return qo, ko


@torch.library.triton_op("inl::triton_rope", mutates_args=())
def triton_rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, offset: int, inverse: bool) -> tuple[Tensor,
                                                                                                      Tensor]:
    """Rotated (q, k), new contiguous tensors; `inverse` rotates back (the gradient)."""
    return _launch(q, k, cos, sin, offset, inverse)


def _setup_context(ctx, inputs, output):
    _q, _k, cos, sin, offset, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.offset, ctx.inverse = offset, inverse


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = triton_rope_op(unit_last(dq), unit_last(dk), cos, sin, ctx.offset, not ctx.inverse)
    return dq, dk, None, None, None, None


triton_rope_op.register_autograd(_backward, setup_context=_setup_context)


def supports(q, k, cos, sin, position_offset):
    if q.dtype == torch.float64 and not interpreting():
        return "float64 runs on the reference (the triton kernels compute in fp32 on a GPU)"
    if cos.requires_grad or sin.requires_grad:
        return "the kernel gives no gradient to cos/sin (they are fixed tables)"
    if q.shape[-1] // 2 > 4096:
        return f"head dims above 8192 are not handled (got {q.shape[-1]})"
    return None


def rope(q, k, cos, sin, position_offset):
    """SPEC §3 rope: returns rotated (q, k), new contiguous tensors."""
    return triton_rope_op(q, k, cos, sin, position_offset, False)
