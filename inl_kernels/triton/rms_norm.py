"""RMSNorm in Triton: forward with an optional fused residual add, backward with a
deterministic weight-gradient reduction, registered as the torch.library ops
`inl::triton_rms_norm` and `inl::triton_rms_norm_backward` (torch.library.triton_op: torch.compile
traces into the kernels; the backward is the forward op's autograd formula).

    s = x (+ residual, rounded to x's dtype)     y = s · rstd · w,   rstd = 1 / sqrt(mean(s²) + eps)

Statistics in fp32 (fp64 for fp64 input, which only the interpreter runs).
"""
from __future__ import annotations


from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import interpreting, multiprocessors

MAX_WIDTH = 65536  # one row lives in one program's registers


@triton.jit
def _rms_norm_forward(X, R, W, Y, S, RSTD, M, N, stride_x, stride_r, stride_y, stride_s, eps,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      ACC: tl.constexpr):
    """Per row: s = x (+ r, rounded to x's dtype), rstd = 1/sqrt(Σ s²/N + eps), y = s·rstd·w.
    Stores y, s (with a residual) and rstd (for the backward). BLOCK_M rows per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        # rounded to x's dtype first, so the fused op equals the unfused `rms_norm(x + r)` bit for bit
        x = (x.to(ACC) + r.to(ACC)).to(X.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)
    y = xf * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_backward(DY, DS, X, W, RSTD, DX, DR, DW_PART, M, N, stride_dy, stride_ds, stride_x,
                       stride_dx, stride_dr, num_programs,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DS: tl.constexpr,
                       HAS_DX: tl.constexpr, HAS_DR: tl.constexpr, HAS_DW: tl.constexpr,
                       ACC: tl.constexpr):
    """With x̂ = s·rstd and g = dy·w:  ds_total = rstd·(g − x̂·mean(g·x̂)) + ds_out,  dw = Σ_rows dy·x̂.
    ds_total goes to DX and/or DR (x and the residual get the same gradient). Each program walks
    row tiles pid, pid + P, ... and writes its dw as one partial row; the launcher sums the P
    partial rows in a fixed order, so dw is the same bits on every run (no atomics)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    num_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(ACC)
        xhat = x * rstd[:, None]
        if HAS_DW:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_DX or HAS_DR:
            g = dy * w[None, :]
            dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None])
            if HAS_DS:
                dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(ACC)
            if HAS_DX:
                tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DR:
                tl.store(DR + rows64 * stride_dr + cols[None, :], dx.to(DR.dtype.element_ty), mask=mask)
    if HAS_DW:
        tl.store(DW_PART + pid * N + cols, dw, mask=col_ok)


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tiles(n):
    """(BLOCK_M, BLOCK_N, num_warps): a whole row per program, several short rows together."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    elems = block_m * block_n
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16 if elems <= 32768 else 32
    return block_m, block_n, num_warps


def _backward_programs(device, num_tiles):
    if device.type == "cuda":
        target = 2 * multiprocessors(device)
    else:
        target = 4  # the interpreter: few programs, each walking several tiles
    return max(1, min(num_tiles, target))


@torch.library.triton_op("inl::triton_rms_norm", mutates_args=())
def triton_rms_norm_op(x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor]) -> tuple[Tensor, Tensor,
                                                                                                   Tensor]:
    """(y, x + residual (empty without a residual), rstd [rows] in the accumulation dtype)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    m = x2.shape[0]
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if residual is not None else x2.new_empty(0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rstd = torch.empty(m, dtype=acc, device=x.device)
    if m:
        r2 = residual.reshape(-1, n) if residual is not None else x2
        s2 = s if residual is not None else y
        block_m, block_n, num_warps = _tiles(n)
        wrap_triton(_rms_norm_forward)[(triton.cdiv(m, block_m),)](
            x2, r2, weight, y, s2, rstd, m, n, x2.stride(0), r2.stride(0), y.stride(0), s2.stride(0), eps,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, ACC=_acc_dtype(x.dtype),
            num_warps=num_warps)
    return y.view(x.shape), (s.view(x.shape) if residual is not None else s), rstd


@torch.library.triton_op("inl::triton_rms_norm_backward", mutates_args=())
def triton_rms_norm_backward_op(dy: Tensor, ds: Optional[Tensor], s: Tensor, weight: Tensor, rstd: Tensor,
                                need_dx: bool, need_dr: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight) of y (and s = x + residual) given their gradients dy (ds); `s` is
    what was normalised. A gradient not asked for comes back empty."""
    n = s.shape[-1]
    s2 = s.reshape(-1, n)
    m = s2.shape[0]
    dy = dy.reshape(m, n)
    if dy.stride(-1) != 1:  # e.g. the expanded gradient of a .sum()
        dy = dy.contiguous()
    if ds is not None:
        ds = ds.reshape(m, n)
        if ds.stride(-1) != 1:
            ds = ds.contiguous()
    dx = torch.empty_like(s2) if need_dx else s2.new_empty(0)
    dr = torch.empty_like(s2) if need_dr else s2.new_empty(0)
    dw = weight.new_empty(0)
    if m and (need_dx or need_dr or need_dw):
        block_m, block_n, num_warps = _tiles(n)
        programs = _backward_programs(s.device, triton.cdiv(m, block_m))
        dw_part = torch.empty(programs, n, dtype=rstd.dtype, device=s.device) if need_dw else rstd
        wrap_triton(_rms_norm_backward)[(programs,)](
            dy, ds if ds is not None else dy, s2, weight, rstd,
            dx if need_dx else s2, dr if need_dr else s2, dw_part, m, n,
            dy.stride(0), ds.stride(0) if ds is not None else 0, s2.stride(0),
            dx.stride(0) if need_dx else 0, dr.stride(0) if need_dr else 0, programs,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_DS=ds is not None, HAS_DX=need_dx, HAS_DR=need_dr,
            HAS_DW=need_dw, ACC=_acc_dtype(s.dtype), num_warps=num_warps)
        if need_dw:
            dw = dw_part.sum(dim=0).to(weight.dtype)
    elif need_dw:
        dw = torch.zeros_like(weight)
    return (dx.view(s.shape) if need_dx else dx), (dr.view(s.shape) if need_dr else dr), dw


def _setup_context(ctx, inputs, output):
    x, weight, _eps, residual = inputs
    _y, s, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(s if ctx.has_residual else x, weight, rstd)


def _backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_dr = ctx.has_residual and ctx.needs_input_grad[3]
    dx, dr, dw = triton_rms_norm_backward_op(dy, ds if ctx.has_residual else None, s, weight, rstd, need_dx, need_dr,
                                             need_dw)
    return (dx if need_dx else None, dw if need_dw else None, None, dr if need_dr else None)


triton_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def supports(x, weight, eps, residual):
    if x.dtype == torch.float64 and not interpreting():
        return "float64 runs on the reference (the triton kernels compute in fp32 on a GPU)"
    if x.shape[-1] > MAX_WIDTH:
        return f"rows wider than {MAX_WIDTH} elements are not handled (got {x.shape[-1]})"
    return None


def rms_norm(x, weight, eps, residual):
    """SPEC §3 rms_norm; with `residual` returns (rms_norm(x + residual), x + residual)."""
    y, s, _ = triton_rms_norm_op(x, weight, eps, residual)
    return (y, s) if residual is not None else y
