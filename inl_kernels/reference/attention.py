"""Eager reference of causal grouped-query attention (SPEC §3).

    out[b, h] = softmax(scale · q[b, h] · k[b, h // G]ᵀ + mask) · v[b, h // G],   G = Hq / Hkv

Queries sit at the end of the keys: query i has index Skv - Sq + i and, when causal, sees
keys j ≤ Skv - Sq + i. Scores and softmax in fp32 (fp64 for fp64 input). K/V are never
repeated: the Hq heads are viewed as [Hkv, G] and broadcast against their K/V head.
With rope=(cos, sin), q and k are rotated at their positions first.

Two optional per-row int tensors [B] serve a static KV cache and padded batches:
- kv_lens: row b has kv_lens[b] valid keys (keys at indices >= kv_lens[b] are unwritten cache
  and never seen); its queries sit at the end of those: query i at index kv_lens[b] - Sq + i.
- kv_starts: the first kv_starts[b] keys of row b are (left) padding, never seen; the position
  of index j (for RoPE) is j - kv_starts[b], so a left-padded row computes what it computes alone.
A query that sees no key at all (a padding query) gets a zero output.
"""
from __future__ import annotations

import math

import torch

from ..common import compute_dtype
from .rope import rotate


def attention(q, k, v, causal=True, scale=None, rope=None, kv_lens=None, kv_starts=None):
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dev = q.device
    lens = kv_lens.long() if kv_lens is not None else torch.full((B,), Skv, device=dev, dtype=torch.long)
    starts = kv_starts.long() if kv_starts is not None else torch.zeros(B, device=dev, dtype=torch.long)
    qidx = lens[:, None] - Sq + torch.arange(Sq, device=dev)[None, :]  # [B, Sq] key index of each query
    kidx = torch.arange(Skv, device=dev)  # [Skv]
    if rope is not None:
        cos, sin = rope
        q = rotate(q, cos, sin, (qidx - starts[:, None]).clamp(min=0)[:, None])
        k = rotate(k, cos, sin, (kidx[None, :] - starts[:, None]).clamp(min=0)[:, None])
    cd = compute_dtype(q.dtype)
    qg = q.to(cd).view(B, Hkv, G, Sq, D)
    kg = k.to(cd)[:, :, None]  # [B, Hkv, 1, Skv, D]: broadcast over the group, no copy
    vg = v.to(cd)[:, :, None]
    scores = (qg @ kg.transpose(-1, -2)) * scale  # [B, Hkv, G, Sq, Skv]
    visible = (kidx[None, None, :] >= starts[:, None, None]) & (kidx[None, None, :] < lens[:, None, None])
    if causal:
        visible = visible & (kidx[None, None, :] <= qidx[:, :, None])  # [B, Sq, Skv]
    seen = visible.any(-1)[:, None, None, :, None]  # [B, 1, 1, Sq, 1]: the query sees some key
    if kv_lens is not None or kv_starts is not None or causal:
        # a query that sees no key (left padding) gets a zero output: its scores are set finite
        # first, so neither the softmax nor its gradient meets a row of -inf (NaN)
        scores = scores.masked_fill(~visible[:, None, None], float("-inf")).masked_fill(~seen, 0.0)
    probs = torch.where(seen, torch.softmax(scores, dim=-1), 0.0)
    return (probs @ vg).reshape(B, Hq, Sq, D).to(q.dtype)
