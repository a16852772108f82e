"""Eager reference of a projection (SPEC §3's matmuls): x·weightᵀ + bias, torch's own
`F.linear` (the op an nn.Linear runs; its bits, autocast and autograd)."""
from __future__ import annotations

import torch.nn.functional as F


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)
