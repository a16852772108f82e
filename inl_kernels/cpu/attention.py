"""Causal grouped-query attention (SPEC §3) on the CPU backend, through PyTorch's fused CPU
attention kernel (`F.scaled_dot_product_attention`, flash-attention style: blocked, online
softmax in fp32, no [Sq, Skv] score matrix kept; forward and backward).

    out[b, h] = softmax(scale · q[b, h] · k[b, h // G]ᵀ + mask) · v[b, h // G],   G = Hq / Hkv

K/V heads are shared by their group through `enable_gqa` (never repeated in memory). Queries
sit at the end of the keys: query i has index Skv − Sq + i and, when causal, sees keys
j ≤ Skv − Sq + i. SDPA's own `is_causal` aligns the mask top-left, so it is used only where the
two agree (Sq = Skv); one query sees every key (decode); otherwise the bottom-right mask is passed
explicitly. With rope=(cos, sin), q and k are rotated at their positions first, both in one call
of the C++ rope (cpu/rope.py: the reference's rotation, its products possibly fused; the KV
cache holds unrotated keys).

kv_lens / kv_starts (a static KV cache, left padding) as in the reference: row b sees keys
[kv_starts[b], kv_lens[b]), its queries end at kv_lens[b], positions count from kv_starts[b], and a
query that sees no key returns zeros. When every row has the same length and no padding (a
batch decoding one prompt), the cache is cut to that length and the plain path runs (in eager
mode: the check reads the lengths).

Decode (at most DECODE_QUERIES queries per row) in eager inference runs csrc/cpu/attention.cpp
instead: the same formula in one call, with the rotated q and k rounded to the input dtype as the
reference rounds them; in fp32, scores, softmax and the weighted sum of values.

A causal prefill (Sq = Skv, no cache lengths) without autocast runs csrc/cpu/attention.cpp's
prefill kernels up to PREFILL_KEYS[path] keys (PREFILL_TRAIN_KEYS with a gradient), after the
same rotation: forward and backward (the
torch.library ops `inl::cpu_attention_prefill`, `inl::cpu_attention_prefill_train` and its
backward outside plain eager inference, so a compiled model gives the eager bits). SDPA's CPU
kernels compute every score of a block of up to 512 keys and mask the causal half afterwards (so
at 256 keys causal attention costs what non-causal does), where these compute only the scores of
keys up to each block of 64 queries. Measured side by side here (2 threads, Intel Xeon with
AVX-512, 8 query / 2 K/V heads of 64, fp32; on the AVX2 and baseline paths with ATen and MKL
pinned to the same instruction set, as on such a machine). AVX-512: forward 1.7x SDPA at
4 x 256 tokens, 1.6x at 1 x 1024, 1.3x at 2048, 1.16x at 4096, 0.85x at 8192; forward + backward
1.5x at 4 x 256 and 1 x 1024, 1.24x at 2048, 1.13x at 4096. AVX2 pinned on that Intel machine:
forward 1.5x at 4 x 256, 1.3x at 1024, 1.0-1.1x at 2048, 0.86x at 4096; forward + backward 1.5x at
4 x 256, 1.3x at 1024, 1.1x at 2048. AVX2 on a real AVX2 machine (2 cores of an AMD EPYC, Zen 3,
torch's own kernels on AVX2 too): forward 1.8x at 4 x 256, 1.6x at 1024, 1.1x at 2048, 1.26x at
4096; forward + backward 1.56x, 1.45x, 1.27x, 0.98x at 4096; the AVX2 forward limit follows the
real machine. Baseline: forward 1.9x at 4 x 256, 1.3x at 2048, 0.58x at 4096; its backward is
slower at every length (0.8x at 256). Hence PREFILL_KEYS and PREFILL_TRAIN_KEYS. Softmax and sums in
fp32, as SDPA's, with the weights below 2^-64 of a row's largest dropped (far below fp32
rounding; subnormal weights cost a microcode assist per FMA: on queries scaled by 30 SDPA's forward + backward took 48.6 ms
instead of 8.3, ours 5.8-6.0 either way). Each query's result depends only on its own row, not
on the batch, the thread count or (with finite values: a zero weight times a later key's inf is
NaN, as in the reference's matmul) later keys; the backward's sums run in one fixed order (dk
and dv per query head, then over the group).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import dtype_name, eager_direct, needs_grad
from ..reference.rope import rotate
from . import _C, capability
from .rope import rotate_pair, tables_supported

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(q, k, v, causal, scale, rope, kv_lens=None, kv_starts=None):
    if q.dtype not in _DTYPES:
        return f"the cpu attention runs float32, bfloat16 and float16, got {dtype_name(q.dtype)}"
    return None


def _sdpa(q, k, v, mask, is_causal, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


# Up to this many queries per row, eager inference runs csrc/cpu/attention.cpp (decode): one call
# that rotates q and the visible keys on the fly, where the SDPA path below makes ~20 small ATen
# ops (two rotations, index tensors, the mask) around the fused kernel. Not under autocast, where
# SDPA computes (and returns) the autocast dtype.
DECODE_QUERIES = 8


def _decode_kernel_runs(q, k, v, rope, kv_lens, kv_starts):
    if (q.shape[2] > DECODE_QUERIES or torch.is_autocast_enabled(q.device.type)
            or not eager_direct(q, k, v, rope, kv_lens, kv_starts)):
        return False
    if rope is None:
        return True
    cos, sin = rope
    return (q.shape[3] % 2 == 0 and cos.dtype == torch.float32 and sin.dtype == torch.float32
            and cos.dim() == 2 and cos.shape[0] >= k.shape[2])


# Sq = Skv up to this many keys, per CPU path, runs the prefill kernels under a causal mask: the
# forward without a gradient (PREFILL_KEYS) and forward + backward (PREFILL_TRAIN_KEYS). Measured
# against SDPA with ATen and MKL on the same instruction set (see the docstring): faster up to
# these lengths; on the baseline path the backward is slower at every length.
PREFILL_KEYS = {"avx512": 4096, "avx2": 4096, "base": 2048}
PREFILL_TRAIN_KEYS = {"avx512": 4096, "avx2": 2048, "base": 0}


@torch.library.custom_op("inl::cpu_attention_prefill", mutates_args=(), device_types="cpu")
def cpu_attention_prefill_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """softmax(scale·q·kᵀ + causal mask)·v with as many queries as keys, q and k rotated already;
    inference only (no autograd formula: attention() calls it only when no gradient is wanted)."""
    return _C.attention_prefill(q, k, v, causal, scale)


@cpu_attention_prefill_op.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("inl::cpu_attention_prefill_train", mutates_args=(), device_types="cpu")
def cpu_attention_prefill_train_op(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                                   scale: float) -> tuple[Tensor, Tensor]:
    """cpu_attention_prefill's output and each query's log-sum-exp of its scaled scores (float32
    [B, Hq, S]), which its backward reads."""
    out, lse = _C.attention_prefill_lse(q, k, v, causal, scale)
    return out, lse


@cpu_attention_prefill_train_op.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("inl::cpu_attention_prefill_backward", mutates_args=(), device_types="cpu")
def cpu_attention_prefill_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                      causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of cpu_attention_prefill_train from the gradient of its output."""
    dq, dk, dv = _C.attention_prefill_backward(grad, q, k, v, out, lse, causal, scale)
    return dq, dk, dv


@cpu_attention_prefill_backward_op.register_fake
def _(grad, q, k, v, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # contiguous: a gradient may come expanded (out.sum().backward() hands zero strides)
    dq, dk, dv = cpu_attention_prefill_backward_op(grad_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


cpu_attention_prefill_train_op.register_autograd(_backward, setup_context=_setup_context)


@torch._dynamo.assume_constant_result
def _prefill_keys(train: bool) -> int:
    """PREFILL_(TRAIN_)KEYS of the path in use; while torch.compile traces, read once as a
    constant (the extension's capability() would break the graph; a path switched after compiling
    keeps the compiled choice, which is as exact, only as fast as that path makes it)."""
    return (PREFILL_TRAIN_KEYS if train else PREFILL_KEYS).get(capability(), 0)


def _prefill(q, k, v, scale):
    """Causal attention with Sq = Skv on the prefill kernels where they run (without autocast, up to
    PREFILL_KEYS or, with a gradient, PREFILL_TRAIN_KEYS), else None. In eager inference the
    extension's function directly; without a gradient the inference op; with one the op that saves
    what its backward reads."""
    train = needs_grad(q, k, v)
    if torch.is_autocast_enabled(q.device.type) or q.shape[2] > _prefill_keys(train):
        return None
    if train:
        return cpu_attention_prefill_train_op(q, k, v, True, scale)[0]
    run = _C.attention_prefill if eager_direct(q, k, v) else cpu_attention_prefill_op
    return run(q, k, v, True, scale)


def _rotated(q, k, rope, q_pos, k_pos):
    """q and k rotated at positions q_pos and k_pos ([S], or [B, S] per row): both in one call of
    the C++ rope (cpu/rope.py) where it takes the tables, else the reference's rotation."""
    cos, sin = rope
    if tables_supported(q, cos, sin) is None:
        return rotate_pair(q, k, cos, sin, q_pos, k_pos)
    per_row = q_pos.dim() == 2
    return (rotate(q, cos, sin, q_pos[:, None] if per_row else q_pos),
            rotate(k, cos, sin, k_pos[:, None] if per_row else k_pos))


def attention(q, k, v, causal=True, scale=None, rope=None, kv_lens=None, kv_starts=None):
    B, Hq, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if _decode_kernel_runs(q, k, v, rope, kv_lens, kv_starts):
        cos, sin = rope if rope is not None else (None, None)
        return _C.attention_decode(q, k, v, causal, scale, cos, sin, kv_lens, kv_starts)
    if not torch.compiler.is_compiling():  # CPU tensors: reading them costs no device sync
        if kv_starts is not None and not bool(kv_starts.any()):
            kv_starts = None
        if kv_lens is not None and kv_starts is None:
            lens = kv_lens.tolist()
            if lens and all(n == lens[0] for n in lens):
                k, v, kv_lens = k[:, :, :lens[0]], v[:, :, :lens[0]], None
    Skv = k.shape[2]
    if kv_lens is None and kv_starts is None:
        if rope is not None:
            q, k = _rotated(q, k, rope, torch.arange(Skv - Sq, Skv, device=q.device),
                            torch.arange(Skv, device=q.device))
        if causal and Sq == Skv:
            out = _prefill(q, k, v, scale)
            return _sdpa(q, k, v, None, True, scale) if out is None else out
        mask = None
        if causal and Sq > 1:
            mask = torch.ones(Sq, Skv, dtype=torch.bool, device=q.device).tril(diagonal=Skv - Sq)
        return _sdpa(q, k, v, mask, False, scale)
    dev = q.device
    lens = kv_lens.long() if kv_lens is not None else torch.full((B,), Skv, device=dev, dtype=torch.long)
    starts = kv_starts.long() if kv_starts is not None else torch.zeros(B, device=dev, dtype=torch.long)
    qidx = lens[:, None] - Sq + torch.arange(Sq, device=dev)[None, :]  # [B, Sq] key index of each query
    kidx = torch.arange(Skv, device=dev)
    if rope is not None:
        q, k = _rotated(q, k, rope, (qidx - starts[:, None]).clamp(min=0),
                        (kidx[None, :] - starts[:, None]).clamp(min=0))
    visible = (kidx[None, None, :] >= starts[:, None, None]) & (kidx[None, None, :] < lens[:, None, None])
    if causal:
        visible = visible & (kidx[None, None, :] <= qidx[:, :, None])  # [B, Sq, Skv]
    seen = visible.any(-1)  # [B, Sq]
    # a query that sees no key (padding) attends to key 0 instead, so that no softmax row is all
    # -inf (NaN, also in the backward), and its output is then zeroed
    visible = visible | (~seen[:, :, None] & (kidx == 0)[None, None, :])
    out = _sdpa(q, k, v, visible[:, None], False, scale)
    return torch.where(seen[:, None, :, None], out, out.new_zeros(()))
