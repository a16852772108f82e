"""Eager reference of causal grouped-query attention (SPEC §3).

    out[b, h] = softmax(scale · q[b, h] · k[b, h // G]ᵀ + mask) · v[b, h // G],   G = Hq / Hkv

Queries sit at the end of the keys: query i has position Skv - Sq + i and, when causal, sees
keys j ≤ Skv - Sq + i. Scores and softmax in fp32 (fp64 for fp64 input). K/V are never
repeated: the Hq heads are viewed as [Hkv, G] and broadcast against their K/V head.
With rope=(cos, sin), q and k are rotated at those positions first.
"""
from __future__ import annotations

import math

import torch

from ..common import compute_dtype
from .rope import rotate


def attention(q, k, v, causal=True, scale=None, rope=None):
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if rope is not None:
        cos, sin = rope
        q = rotate(q, cos, sin, torch.arange(Skv - Sq, Skv, device=q.device))
        k = rotate(k, cos, sin, torch.arange(Skv, device=q.device))
    cd = compute_dtype(q.dtype)
    qg = q.to(cd).view(B, Hkv, G, Sq, D)
    kg = k.to(cd)[:, :, None]  # [B, Hkv, 1, Skv, D]: broadcast over the group, no copy
    vg = v.to(cd)[:, :, None]
    scores = (qg @ kg.transpose(-1, -2)) * scale  # [B, Hkv, G, Sq, Skv]
    if causal:
        qpos = torch.arange(Skv - Sq, Skv, device=q.device)[:, None]
        kpos = torch.arange(Skv, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ vg).reshape(B, Hq, Sq, D).to(q.dtype)
