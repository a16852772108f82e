"""Eager reference of rotary position embedding, rotate-half convention (SPEC §3).

With x1 = x[..., :D/2], x2 = x[..., D/2:] and c, s the rows of cos/sin for positions
offset … offset+S-1:   out = cat(x1·c - x2·s, x2·c + x1·s).
"""
from __future__ import annotations

import torch

from ..common import compute_dtype


def rope_tables(max_seq_len, head_dim, base=10000.0, device=None, dtype=torch.float32):
    """cos, sin [max_seq_len, head_dim/2] of p · base^(-2i/D), computed in fp64 then cast."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin, positions):
    """Rotates x [..., S, D] by the table rows at `positions` (a LongTensor [S])."""
    cd = compute_dtype(x.dtype)
    half = x.shape[-1] // 2
    c, s = cos[positions].to(cd), sin[positions].to(cd)
    x1, x2 = x[..., :half].to(cd), x[..., half:].to(cd)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope(q, k, cos, sin, position_offset=0):
    positions = torch.arange(position_offset, position_offset + q.shape[-2], device=q.device)
    return rotate(q, cos, sin, positions), rotate(k, cos, sin, positions)
