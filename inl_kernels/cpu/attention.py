"""Causal grouped-query attention (SPEC §3) on the CPU backend, through PyTorch's fused CPU
attention kernel (`F.scaled_dot_product_attention`, flash-attention style: blocked, online
softmax in fp32, no [Sq, Skv] score matrix kept; forward and backward).

    out[b, h] = softmax(scale · q[b, h] · k[b, h // G]ᵀ + mask) · v[b, h // G],   G = Hq / Hkv

K/V heads are shared by their group through `enable_gqa` (never repeated in memory). Queries
sit at the end of the keys: query i has position Skv − Sq + i and, when causal, sees keys
j ≤ Skv − Sq + i. SDPA's own `is_causal` aligns the mask top-left, so it is used only where the
two agree (Sq = Skv); one query sees every key (decode); otherwise the bottom-right mask is passed
explicitly. With rope=(cos, sin), q is rotated at positions Skv − Sq … Skv − 1 and k at 0 … Skv − 1
first (the reference's rotation: the KV cache holds unrotated keys).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..reference.rope import rotate

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(q, k, v, causal, scale, rope):
    if q.dtype not in _DTYPES:
        return f"the cpu attention runs float32, bfloat16 and float16, got {str(q.dtype).replace('torch.', '')}"
    return None


def attention(q, k, v, causal=True, scale=None, rope=None):
    Sq, Skv, D = q.shape[2], k.shape[2], q.shape[3]
    if rope is not None:
        cos, sin = rope
        q = rotate(q, cos, sin, torch.arange(Skv - Sq, Skv, device=q.device))
        k = rotate(k, cos, sin, torch.arange(Skv, device=q.device))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask, is_causal = None, False
    if causal and Sq == Skv:
        is_causal = True
    elif causal and Sq > 1:
        mask = torch.ones(Sq, Skv, dtype=torch.bool, device=q.device).tril(diagonal=Skv - Sq)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=gqa)
