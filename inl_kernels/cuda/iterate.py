"""The iterate's forward (SPEC §2) on the hand-written CUDA kernel, csrc/cuda/iterate.cu: a
persistent kernel that splits d across the GPU for decode shapes (a few hundred rows at most).
It has no backward and returns no trajectory; ask for it by name (backend="cuda")."""
from __future__ import annotations

import torch

from ..reference.iterate import IterateInfo, excitation_table
from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 256  # beyond this the rows no longer fit the kernel's shared memory: a job for triton


def supports(h, x, *, v=None, return_trajectory=False, **kw):
    if h.dtype not in _DTYPES:
        return f"the cuda iterate runs float32, bfloat16 and float16 inputs, got {str(h.dtype).replace('torch.', '')}"
    if h.shape[0] > MAX_ROWS:
        return f"the cuda iterate is a decode kernel for up to {MAX_ROWS} rows, got {h.shape[0]}"
    if return_trajectory:
        return "the cuda iterate returns no trajectory"
    tensors = (h, x, v, *(kw[k] for k in ("w_h", "b_h", "w_x", "b_x", "w_v", "b_v", "w_o", "b_o", "mod_scale",
                                          "mod_bias", "mu", "gamma", "phi")))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "the cuda iterate has no backward (inference only)"
    return None


def iterate(h, x, *, w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o, mod_scale, mod_bias, mu, exc_index, gamma, phi,
            amplitude, dt, kappa, num_iterations, v=None, tol=None, min_iterations=3, return_trajectory=False):
    """Runs SPEC §2 on CUDA tensors; returns (x_T, IterateInfo) with the reference's dtypes."""
    table = excitation_table(exc_index, gamma, phi, amplitude, num_iterations, x.shape[1], dtype=torch.float32)
    bias = b_h.float() + b_x.float() + b_v.float()
    mod = torch.cat([mod_scale, mod_bias]).float()
    x_T, v_T, iterations, energy, distance = _C.iterate_forward_cuda(
        h, x, v, w_h.float(), w_x.float(), w_v.float(), w_o.float(), bias, b_o.float(), mod, mu.float(), table,
        dt, kappa, num_iterations, tol, min_iterations)
    return x_T, IterateInfo(v_T, iterations, energy, distance)
