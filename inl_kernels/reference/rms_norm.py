"""Eager reference of RMSNorm (SPEC §3).

    y = x · rsqrt(mean(x²) + eps) · weight          statistics in fp32 (fp64 for fp64 input)

With `residual=r` the sum s = x + r is rounded to x's dtype first (exactly what an unfused
`x = x + r; rms_norm(x)` computes) and (rms_norm(s), s) is returned.
"""
from __future__ import annotations

import torch

from ..common import compute_dtype


def rms_norm(x, weight, eps=1e-6, residual=None):
    if residual is not None:
        x = (x.to(compute_dtype(x.dtype)) + residual.to(compute_dtype(x.dtype))).to(x.dtype)
    cd = compute_dtype(x.dtype)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(cd)
    y = y.to(x.dtype)
    return (y, x) if residual is not None else y
