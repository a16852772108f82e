"""The iterate's forward (SPEC §2) on the hand-written CUDA kernel, csrc/cuda/iterate.cu: a
persistent cooperative kernel that splits d across the GPU for decode shapes (a few hundred rows
at most). It has no backward and returns no trajectory; ask for it by name (backend="cuda").
Registered as the torch.library op `inl::cuda_iterate` (forward only).

The launch plan, how many columns of d each block owns, is made here once per (N, d, H, dtype,
device) and cached, so that a decode step asks the GPU nothing. `plan` mirrors the kernel's
shared memory (csrc/cuda/iterate_layout.h) and asks the GPU only how many blocks of a given size
fit on one multiprocessor. `supports` refuses the shapes that have no plan, so that
backend="cuda" raises a ValueError naming them rather than failing at launch.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..common import IterateInfo, IterateParams, IterateSettings, dtype_name, fold_parameters, needs_grad
from . import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_COLS = 32  # iterate_layout.h kMinCols: columns of d per block at the narrowest slice


def shared_bytes(N: int, H: int, cols: int) -> int:
    """Shared memory of one block owning `cols` columns of N rows with hidden size H, in bytes
    (iterate_layout.h): w_out and w_in (6·H·cols floats), x, v and (x' − x)² of its columns
    (3·N·cols), c (N·H) and three values per row (3·N)."""
    return 4 * (6 * H * cols + 3 * N * cols + N * H + 3 * N)


class Plan(NamedTuple):
    blocks: int  # ceil(d / cols): all resident at once (a cooperative launch)
    cols: int  # columns of d per block
    shared_bytes: int  # per block


def plan(N: int, d: int, H: int, sms: int, max_shared: int, resident: Callable[[int], int]) -> Optional[Plan]:
    """The narrowest column slice, MIN_COLS doubled until one block holds all of d, whose blocks
    all fit on the GPU at once; None when there is none. A wider slice needs fewer blocks but
    more shared memory each. `sms`: multiprocessors; `max_shared`: the shared memory a block may
    opt in to; `resident(bytes)`: blocks that fit on one multiprocessor with that much each."""
    cols = MIN_COLS
    while True:
        blocks = -(-d // cols)
        need = shared_bytes(N, H, cols)
        if need > max_shared:
            return None  # wider slices only need more
        if blocks <= resident(need) * sms:
            return Plan(blocks, cols, need)
        if blocks == 1:
            return None
        cols *= 2


@functools.lru_cache(maxsize=None)
def _limits(device_index: int) -> tuple:
    """(multiprocessors, shared memory a block may opt in to) of a GPU."""
    return tuple(_C.iterate_decode_limits(device_index))


def _resident(dtype: torch.dtype, device_index: int) -> Callable[[int], int]:
    return lambda nbytes: _C.iterate_decode_resident(dtype, nbytes, device_index)


@functools.lru_cache(maxsize=None)
def decode_plan(N: int, d: int, H: int, dtype: torch.dtype, device_index: int) -> Optional[Plan]:
    """`plan` for this GPU, asked once per shape (the GPU queries happen on the first call only)."""
    sms, max_shared = _limits(device_index)
    return plan(N, d, H, sms, max_shared, _resident(dtype, device_index))


def _no_plan_reason(N, d, H, dtype, device_index) -> Optional[str]:
    if decode_plan(N, d, H, dtype, device_index) is not None:
        return None
    sms, max_shared = _limits(device_index)
    need = shared_bytes(N, H, MIN_COLS)
    if need > max_shared:
        why = (f"a block needs {need} bytes of shared memory at the narrowest column slice ({MIN_COLS} columns), "
               f"this GPU allows {max_shared}")
    else:
        why = f"the blocks that split d = {d} do not all fit on the GPU's {sms} multiprocessors at once"
    return f"N = {N} rows with H = {H} do not fit the cuda decode kernel: {why}; use backend='triton'"


@torch.library.custom_op("inl::cuda_iterate", mutates_args=(), device_types="cuda")
def cuda_iterate_op(h: Tensor, x: Tensor, v: Optional[Tensor], w_h: Tensor, w_x: Tensor, w_v: Tensor, w_o: Tensor,
                    bias: Tensor, b_o: Tensor, mod: Tensor, mu: Tensor, table: Optional[Tensor], dt: float,
                    kappa: Optional[float], num_iterations: int, tol: Optional[float], min_iterations: int,
                    blocks: int, cols: int, shared_bytes: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x_T, v_T, iterations, energy, distance) with the launch plan (blocks, cols, shared_bytes)."""
    x_T, v_T, iterations, energy, distance = _C.iterate_forward_cuda(
        h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, tol, min_iterations,
        blocks, cols, shared_bytes)
    return x_T, v_T, iterations, energy, distance


@cuda_iterate_op.register_fake
def _(h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table, dt, kappa, num_iterations, tol, min_iterations, blocks,
      cols, shared_bytes):
    n, d = x.shape
    f32 = torch.float32
    return (x.new_empty(n, d), x.new_empty(n, d), x.new_empty(n, dtype=torch.int32),
            x.new_empty(n, num_iterations, dtype=f32), x.new_empty(n, num_iterations, dtype=f32))


def supports(h, x, v, params: IterateParams, settings: IterateSettings) -> Optional[str]:
    if h.dtype not in _DTYPES:
        return f"the cuda iterate runs float32, bfloat16 and float16 inputs, got {dtype_name(h.dtype)}"
    if settings.return_trajectory:
        return "the cuda iterate returns no trajectory"
    if needs_grad(h, x, v, params):
        return "the cuda iterate has no backward (inference only)"
    return _no_plan_reason(h.shape[0], h.shape[1], params.hidden, h.dtype, h.device.index)


def iterate(h, x, v, params: IterateParams, settings: IterateSettings):
    """Runs SPEC §2 on CUDA tensors; returns (x_T, IterateInfo) with the reference's dtypes."""
    N, d = x.shape
    launch = decode_plan(N, d, params.hidden, h.dtype, h.device.index)
    if launch is None:
        raise ValueError(_no_plan_reason(N, d, params.hidden, h.dtype, h.device.index))
    s, p = settings, params
    folded = fold_parameters(params, s, d, torch.float32)
    x_T, v_T, iterations, energy, distance = cuda_iterate_op(
        h, x, v, p.w_h.float(), p.w_x.float(), p.w_v.float(), p.w_o.float(), folded.bias, p.b_o.float(), folded.mod,
        p.mu.float(), folded.table, s.dt, s.kappa, s.num_iterations, s.tol, s.min_iterations, *launch)
    return x_T, IterateInfo(v_T, iterations, energy, distance)
