"""Eager reference of the SwiGLU feed-forward (SPEC §3).

    swiglu(x) = (silu(x·w_gateᵀ) · (x·w_upᵀ)) · w_downᵀ
"""
from __future__ import annotations

import torch.nn.functional as F


def swiglu(x, w_gate, w_up, w_down):
    # fp32 master weights under bf16/fp16 activations: the matmuls run in the activations' dtype
    w_gate, w_up, w_down = (w.to(x.dtype) for w in (w_gate, w_up, w_down))
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()
