"""Triton kernels of the integrator iterate (SPEC §2): forward (tile and decode paths) and backward.

Per row, for t = 0 .. T-1 (all of it inside the kernels):

    c       = relu(h·w_hᵀ + bias + x·w_xᵀ + v·w_vᵀ)            bias = b_h + b_x + b_v
    a,b,g,u = split(c·w_oᵀ + b_o, 4)
    alpha   = sigmoid(ms0·a + mb0) · (1 - exp(-kappa·rms(x - mu)))     (second factor if kappa)
    v'      = alpha·v + (1-alpha)·(ms3·u + mb3) - softplus(ms1·b + mb1)·(x - mu) + table[t]
    x'      = x + dt · sigmoid(ms2·g + mb2) · v'

The launcher does in torch what autograd should see: the excitation as a [T, d] table
(`reference.iterate.excitation_table`), the combined bias b_h + b_x + b_v and the 8 modulation
scalars (mod_scale, mod_bias) as one vector. The kernels never evaluate a sine.

Block shapes (issue 17) are chosen from the static sm_90 compile, `benchmarks/kernel_report.py`,
whose table (benchmarks/results/kernel-report-sm90.json) lists registers, spills, programs per
multiprocessor and bytes per row and step of every kernel at every configuration: for bf16 and
fp16 no kernel spills at any H and the forward tile kernel runs 2 programs (8 warps) per
multiprocessor; the misses, all fp32 (its backward; the forward at H = 64 and 128), are listed
there with reasons.

Forward: a prologue launch (`_fwd_prologue`: h·w_hᵀ, step 0's x·w_xᵀ + v·w_vᵀ and Σ(x-mu)²), then
one launch per step. Rows never meet, so results are batch invariant:

* tile path (`_tile_step`, N > DECODE_MAX_ROWS or any training call): one program per BM = 64
  rows walks all of d in BD = 16 column blocks (fp32: 128 × 8 at H <= 32, 64 × 8 at H = 128,
  over 8 warps; `_block_shape`): it forms c = relu(ctx + pre_t) from the
  [N, H] row vectors of the previous launch, and ONE pass over the blocks computes the four
  controller outputs with tl.dot (M = 64: one wgmma warp group), updates x, v, stores them and,
  from x', v' in the same pass, accumulates the next step's pre-activation and the row sums
  (next rms, ‖x'-x‖², energy, distance). So a step reads the state once and writes it once; the
  state lives in fp32 (an fp32 scratch for bf16/fp16 inputs, the outputs themselves for fp32),
  and the last step writes the outputs in their dtype directly (no cast pass; the scratch keeps
  x_{T-1}, v_{T-1}, which the backward reads). Per-step launches keep the kernel small (no
  context tile held through the call) and let early exit save time: see below.
* decode path (`_decode_step` + `_decode_reduce`, small N): the tile path's block shape, with
  the d blocks spread over programs (NB = 2 blocks each: 64 rows × d = 2048 is 64 programs).
  Every block's shares of the row reductions are stored and one ordered reduce launch a step
  adds them, block after block in column order, exactly as the tile path adds them, and
  decides convergence. 2T + 2 launches, no host synchronisation: the call can be captured in a
  CUDA graph (the 50 µs decode target needs one).

Both paths add the same per-block shares in the same column order, with the same dot
instructions (both M = 64 tiles): a row has the same bits on either side of DECODE_MAX_ROWS
(tested under the interpreter; on a GPU the cuda-marked run checks it). The shares start from
a runtime zero (`_dot_from_zero`): from a constant zero Triton's combiner would fold the tile
path's `acc + share` into tl.dot(..., acc), which rounds differently.

Early exit (issue 15): after each step a row whose ‖x' − x‖₂ < tol after at least
min_iterations steps is converged, exactly as the reference compares it. The tile path then
re-forms its tiles from the rows still running (`_compact_rows`: a prefix sum over the rows'
flags, one small program, no host synchronisation), so the next step's grid does work only
for those rows and a converged row costs nothing after its last step; its bits are those it
would have had in any batch (its row is computed alone either way). Rows that stopped before
the last step reach the outputs through `_copy_stopped`. The decode path keeps stopped rows
frozen (tl.where) and skips tiles with none running. Statistics and trajectory entries a
stopped row did not write are filled on the host by a gather over clamp(t, max=iterations).

Backward (`inl::triton_iterate_train` + `inl::triton_iterate_backward`): the forward saves the
inputs, per step the controller hidden c_t [T, N, H] (fp32, and in the dots' dtype) and the row
rms_t [T, N], and for bf16/fp16 inputs
its fp32 state buffers, which hold x_{T-1}, v_{T-1}. Given c and rms the state recurrence is
column-local: any d-block's x_t, v_t replays from x_0, v_0 with 4 small dots a step and no row
reduction. The reverse-time recurrence then runs in two kernels:
* phase 1 (`_bwd_rows`, BM = 128 rows over 8 warps): per step t, one pass over the d-blocks
  gets the block's state (x_{T-1} read from the saved state; earlier steps replayed, O(T²)
  steps in all but the last's T-1 saved), pulls the gradient through the step and accumulates
  the row-coupled pieces: dL/dc_t (tl.dot with w_o) -> gpre_t [T, N, H], dL/drms_t -> rc_t [T, N].
  The direct gradients of x_t, v_t wait for step t-1 in an fp32 carry, which for bf16/fp16 is
  the forward's state buffer itself (no extra memory); once phase 1 is done its storage holds
  dL/dh and dL/dx in the input dtype.
* torch: dh = (Σ_t gpre_t)·w_h, dw_h = (Σ_t gpre_t)ᵀ·h, d bias = Σ gpre.
* phase 2 (`_bwd_cols`, 64 rows × 16 columns over 8 warps, row splits): with gpre and rc known
  the reverse recurrence is column-local. Per tile each program replays the forward ONCE into
  its own slice of an L2-sized scratch (adding dw_x, dw_v on the way), runs the recurrence with
  (gx, gv) in registers, parking the four dL/dz_q per step in a second scratch, then adds
  dw_o's share; the weight-gradient accumulators are read and written once per tile in the
  program's partial slots, so the recurrence runs without them in registers. torch sums the
  splits in a fixed order (no atomics: same bits every run) and forms d mod_scale from
  P_q = Σ g_zqᵀ·c and dz_q (q = c·w_oᵀ + b_o).
Autograd chains d table to gamma and phi, d bias to b_h, b_x, b_v, d mod to mod_scale and
mod_bias. Gradients flow through info.energy and info.distance as well, so the integrator
losses train without a stored trajectory. return_trajectory=True under grad runs on the
reference (auto picks it; `supports` says why). Memory during training, 16384 × 2048, T = 5,
H = 64, bf16, besides inputs and outputs: the fp32 state pair (256 MiB, which then holds dL/dh
and dL/dx), c in fp32 and bf16 and rms (30 MiB), gpre in fp32 and bf16 (30 MiB), phase 2's
partials and scratch (~50 MiB) — about 500 MiB peak by benchmarks/bench_iterate.py's count,
estimated, not measured.

Precision: x, v, every accumulation and reduction in fp32 (fp64 when given fp64, which only
the interpreter runs: the fp64 gradcheck). Matmul operands go to the tensor cores in the
activation dtype (DOT constexpr: bf16/fp16 on a GPU; the interpreter multiplies bf16 dots
wrongly, so there it uses fp32); fp32 dots on a GPU use tf32x3 (about fp32 accuracy on
tensor cores) rather than plain tf32, which would miss fp32 tolerances. The backward replays
in the form ms_q·(c·w_oᵀ) + (ms_q·b_o + mb_q), an ulp away from the forward's rounding.

Determinism: same inputs, same bits, in every process: block sizes are a fixed function of the
shape (`_block_shape`, `_backward_config`), never picked by timing.

Speed: not yet measured on a GPU. What the design expects (to be checked by
benchmarks/bench_iterate.py and benchmarks/sweep_iterate.py on an H200): the forward bound
by L2 traffic (~59 KB per row and step at 16384 × 2048 bf16, ~5 GB a call: about 1 ms at
5 TB/s) rather than by exposed latency and spills as before (5.5 ms measured); the backward
a few forwards (its tensor-core and transcendental work is ~4.5 forwards').
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import interpreting, multiprocessors
from ..common import IterateInfo, IterateParams, IterateSettings, compute_dtype, fold_parameters, needs_grad

SUPPORTED_HIDDEN = (16, 32, 64, 128)
# Batches up to this many rows take the decode path (d split across programs).
DECODE_MAX_ROWS = 256


# ----------------------------------------------------------------------------------------------
# shared pieces of the step


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _softplus(z):
    # max(z, 0) + log1p(exp(-|z|)), with log1p(y) = log(1+y)·y/((1+y)-1), exact also where
    # 1+y rounds to 1 (tl has no log1p that the interpreter and triton 3.6 both know)
    y = tl.exp(-tl.abs(z))
    u = 1.0 + y
    lp = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(z, 0.0) + lp


@triton.jit
def _softplus_sigmoid(z):
    """(softplus(z), sigmoid(z)) from one exp(-|z|): sigmoid(z) = 1/(1+y) for z >= 0 and
    y/(1+y) below, y = exp(-|z|)."""
    y = tl.exp(-tl.abs(z))
    u = 1.0 + y
    lp = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(z, 0.0) + lp, tl.where(z >= 0, 1.0, y) / u


@triton.jit
def _load_mod(mod_ptr, ACC: tl.constexpr):
    return (tl.load(mod_ptr + 0).to(ACC), tl.load(mod_ptr + 1).to(ACC), tl.load(mod_ptr + 2).to(ACC),
            tl.load(mod_ptr + 3).to(ACC), tl.load(mod_ptr + 4).to(ACC), tl.load(mod_ptr + 5).to(ACC),
            tl.load(mod_ptr + 6).to(ACC), tl.load(mod_ptr + 7).to(ACC))


@triton.jit
def _load_w_in(w_ptr, cols, col_mask, hk, D, DOT: tl.constexpr):
    """Columns `cols` of an input-layer weight w_* [H, D] as the [BD, H] operand of x·w_*ᵀ
    (loaded along its contiguous rows, transposed in registers)."""
    w = tl.load(w_ptr + hk[:, None] * D + cols[None, :], mask=col_mask[None, :], other=0.0)
    return tl.trans(w.to(DOT))


@triton.jit
def _load_w_out_rows(w_o_ptr, q, cols, col_mask, hk, D, H: tl.constexpr, DOT: tl.constexpr):
    """Rows q·D + cols of w_o [4D, H]: [BD, H]."""
    w = tl.load(w_o_ptr + (q * D + cols[:, None]) * H + hk[None, :], mask=col_mask[:, None], other=0.0)
    return w.to(DOT)


@triton.jit
def _load_w_out(w_o_ptr, q, cols, col_mask, hk, D, H: tl.constexpr, DOT: tl.constexpr):
    """Rows q·D + cols of w_o [4D, H] as the [H, BD] operand of c·w_oᵀ."""
    return tl.trans(_load_w_out_rows(w_o_ptr, q, cols, col_mask, hk, D, H, DOT))


@triton.jit
def _controller_quarter(cd, w_o_ptr, b_o_ptr, q, cols, col_mask, hk, D,
                        H: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """Quarter q of the controller output on columns `cols`: cd·w_o[q·D + cols, :]ᵀ + b_o[q·D + cols]."""
    out = tl.dot(cd, _load_w_out(w_o_ptr, q, cols, col_mask, hk, D, H, DOT), input_precision=PREC, out_dtype=ACC)
    return out + tl.load(b_o_ptr + q * D + cols, mask=col_mask, other=0.0).to(ACC)[None, :]


@triton.jit
def _step_block(c, x, v, err, alpha_scale, exc, w_o_ptr, b_o_ptr, cols, col_mask, hk, D, dt,
                ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3,
                H: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """One step on a [BM, BD] block: v' = alpha·v + (1-alpha)·v_cand - beta·err + exc,
    x' = x + dt·gate·v'. Each controller quarter is used up before the next dot, so only
    one [BM, BD] dot result is live at a time (register pressure)."""
    cd = c.to(DOT)
    alpha = _sigmoid(ms0 * _controller_quarter(cd, w_o_ptr, b_o_ptr, 0, cols, col_mask, hk, D, H, DOT, PREC,
                                               ACC) + mb0) * alpha_scale[:, None]
    v_cand = ms3 * _controller_quarter(cd, w_o_ptr, b_o_ptr, 3, cols, col_mask, hk, D, H, DOT, PREC, ACC) + mb3
    v_new = alpha * v + (1 - alpha) * v_cand
    beta = _softplus(ms1 * _controller_quarter(cd, w_o_ptr, b_o_ptr, 1, cols, col_mask, hk, D, H, DOT, PREC,
                                               ACC) + mb1)
    v_new = v_new - beta * err + exc[None, :]
    gate = _sigmoid(ms2 * _controller_quarter(cd, w_o_ptr, b_o_ptr, 2, cols, col_mask, hk, D, H, DOT, PREC,
                                              ACC) + mb2)
    return x + dt * gate * v_new, v_new


@triton.jit
def _in_range(idx, limit, EVEN: tl.constexpr):
    """idx < limit, or a constant true when the launcher knows the shape divides into whole
    blocks (EVEN): the compiler then drops every mask, and the registers they hold."""
    if EVEN:
        return tl.full(idx.shape, 1, tl.int1)
    else:
        return idx < limit


@triton.jit
def _load_block(ptr, offs, mask, ACC: tl.constexpr):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _dot_from_zero(a, b, zero, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """a·b started from `zero`, a runtime 0.0. From a constant zero, Triton's combiner folds a
    later `acc + a·b` into tl.dot(a, b, acc), which rounds differently from adding the finished
    product: the tile path adds each block's share in registers, the decode path adds shares
    stored by other programs, and both must add the same finished shares (batch invariance)."""
    return tl.dot(a, b, tl.zeros([BM, BN], dtype=ACC) + zero, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _block_preact(x, v, w_x_ptr, w_v_ptr, cols, col_mask, hk, D, zero, BM: tl.constexpr, H: tl.constexpr,
                  HAS_V: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """One d-block's share of the next pre-activation, x·w_xᵀ + v·w_vᵀ over the block's columns,
    started from zero. Both paths add these shares block by block in column order (the tile
    path in its loop, the decode path across slices), so they reduce over d in the same order."""
    pre = _dot_from_zero(x.to(DOT), _load_w_in(w_x_ptr, cols, col_mask, hk, D, DOT), zero, BM, H, PREC, ACC)
    if HAS_V:
        pre = tl.dot(v.to(DOT), _load_w_in(w_v_ptr, cols, col_mask, hk, D, DOT), pre, input_precision=PREC,
                     out_dtype=ACC)
    return pre


@triton.jit
def _advance_block(t, c, alpha_scale, active, rows64, offs, m, cols, col_mask, hk, D, T, dt,
                   x0_ptr, v0_ptr, xs_ptr, vs_ptr, xo_ptr, vo_ptr, w_o_ptr, b_o_ptr, mu_ptr, exc_ptr,
                   trajx_ptr, trajv_ptr, ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3,
                   H: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_V: tl.constexpr,
                   HAS_EXC: tl.constexpr, FREEZE: tl.constexpr, TRAJ: tl.constexpr, FINAL_OUT: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """Step t on one [BM, BD] block of the state, shared by the tile and the decode path: reads
    x, v (the inputs at t = 0, the fp32 state after), runs `_step_block` with row t of the
    excitation table, keeps rows outside `active` as they are (FREEZE: the decode path's early
    exit), stores x', v' to the state, or with FINAL_OUT at the last step straight to the
    outputs in their dtype (so the state keeps x_{T-1}, v_{T-1}, which the backward reads), and
    entry t+1 of the trajectory. Returns (x, x', v', mu) with masked columns of x', v' zeroed,
    ready for the caller's row sums."""
    if t == 0:
        x = _load_block(x0_ptr, offs, m, ACC)
        if HAS_V:
            v = _load_block(v0_ptr, offs, m, ACC)
        else:
            v = tl.zeros([BM, BD], dtype=ACC)
    else:
        x = _load_block(xs_ptr, offs, m, ACC)
        v = _load_block(vs_ptr, offs, m, ACC)
    mu = tl.load(mu_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    if HAS_EXC:
        exc = tl.load(exc_ptr + t * D + cols, mask=col_mask, other=0.0).to(ACC)
    else:
        exc = tl.zeros([BD], dtype=ACC)
    x_new, v_new = _step_block(c, x, v, x - mu[None, :], alpha_scale, exc, w_o_ptr, b_o_ptr, cols, col_mask,
                               hk, D, dt, ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3, H, DOT, PREC, ACC)
    if FREEZE:
        x_new = tl.where(active[:, None], x_new, x)
        v_new = tl.where(active[:, None], v_new, v)
        store_mask = m & active[:, None]
    else:
        store_mask = m
    # masked columns hold bias-driven values: zero them before any row reduction
    x_new = tl.where(m, x_new, 0.0)
    v_new = tl.where(m, v_new, 0.0)
    if FINAL_OUT:
        if t == T - 1:
            tl.store(xo_ptr + offs, x_new.to(xo_ptr.dtype.element_ty), mask=store_mask)
            tl.store(vo_ptr + offs, v_new.to(vo_ptr.dtype.element_ty), mask=store_mask)
        else:
            tl.store(xs_ptr + offs, x_new, mask=store_mask)
            tl.store(vs_ptr + offs, v_new, mask=store_mask)
    else:
        tl.store(xs_ptr + offs, x_new, mask=store_mask)
        tl.store(vs_ptr + offs, v_new, mask=store_mask)
    if TRAJ:
        t_offs = rows64[:, None] * (T + 1) * D + (t + 1) * D + cols[None, :]
        tl.store(trajx_ptr + t_offs, x_new.to(trajx_ptr.dtype.element_ty), mask=m)
        tl.store(trajv_ptr + t_offs, v_new.to(trajv_ptr.dtype.element_ty), mask=m)
    return x, x_new, v_new, mu


# ----------------------------------------------------------------------------------------------
# forward: the prologue of both paths


@triton.jit
def _fwd_prologue(
    h_ptr, x0_ptr, v0_ptr, w_h_ptr, w_x_ptr, w_v_ptr, bias_ptr, mu_ptr,
    ctx_ptr, pre_ptr, stat_ptr, trajx_ptr, trajv_ptr,
    N, D, T, NB, zero,
    H: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_V: tl.constexpr, TRAJ: tl.constexpr,
    SINGLE: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """For BM rows and column blocks blk = g·NB .. g·NB + NB-1 (g = program_id(1)), each
    block's share of h·w_hᵀ, of step 0's x·w_xᵀ + v·w_vᵀ and of Σ(x - mu)². SINGLE (the tile
    path, one group over all of d): the shares added in column order and finished, ctx =
    h·w_hᵀ + bias [N, H], pre [N, H], sq [N]. Else (decode) every block's share is stored:
    ctx[blk] [NBLK, N, H], pre[blk] [NBLK, N, H], stat[0, blk] [4, NBLK, N], for
    `_decode_reduce` to add in the same column order."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = _in_range(rows, N, EVEN)
    rows64 = rows.to(tl.int64)
    hk = tl.arange(0, H)
    ctx = tl.zeros([BM, H], dtype=ACC)
    pre = tl.zeros([BM, H], dtype=ACC)
    sq = tl.zeros([BM], dtype=ACC)
    for b in range(NB):
        blk = g * NB + b
        cols = blk * BD + tl.arange(0, BD)
        col_mask = _in_range(cols, D, EVEN)
        m = row_mask[:, None] & col_mask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        hb = tl.load(h_ptr + offs, mask=m, other=0.0).to(DOT)
        ctx_share = _dot_from_zero(hb, _load_w_in(w_h_ptr, cols, col_mask, hk, D, DOT), zero, BM, H, PREC, ACC)
        xb = _load_block(x0_ptr, offs, m, ACC)
        if HAS_V:
            vb = _load_block(v0_ptr, offs, m, ACC)
        else:
            vb = tl.zeros([BM, BD], dtype=ACC)
        pre_share = _block_preact(xb, vb, w_x_ptr, w_v_ptr, cols, col_mask, hk, D, zero, BM, H, HAS_V, DOT, PREC,
                                  ACC)
        mu = tl.load(mu_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        err = tl.where(m, xb - mu[None, :], 0.0)
        sq_share = tl.sum(err * err, axis=1)
        if TRAJ:
            t_offs = rows64[:, None] * (T + 1) * D + cols[None, :]
            tl.store(trajx_ptr + t_offs, xb.to(trajx_ptr.dtype.element_ty), mask=m)
            tl.store(trajv_ptr + t_offs, vb.to(trajv_ptr.dtype.element_ty), mask=m)
        if SINGLE:
            ctx += ctx_share
            pre += pre_share
            sq += sq_share
        else:
            share_offs = (blk * N + rows64)[:, None] * H + hk[None, :]
            in_d = row_mask & (tl.zeros([BM], dtype=tl.int32) + blk * BD < D)  # the last group may end past d
            tl.store(ctx_ptr + share_offs, ctx_share, mask=in_d[:, None])
            tl.store(pre_ptr + share_offs, pre_share, mask=in_d[:, None])
            tl.store(stat_ptr + blk * N + rows64, sq_share, mask=in_d)
    if SINGLE:
        ctx += tl.load(bias_ptr + hk).to(ACC)[None, :]
        tl.store(ctx_ptr + rows64[:, None] * H + hk[None, :], ctx, mask=row_mask[:, None])
        tl.store(pre_ptr + rows64[:, None] * H + hk[None, :], pre, mask=row_mask[:, None])
        tl.store(stat_ptr + rows64, sq, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# forward, tile path: one launch per step, rows re-formed into tiles between steps


@triton.jit(do_not_specialize=["t"])
def _tile_step(
    x0_ptr, v0_ptr, xs_ptr, vs_ptr, xo_ptr, vo_ptr,
    w_x_ptr, w_v_ptr, w_o_ptr, b_o_ptr, mod_ptr, mu_ptr, exc_ptr,
    ctx_ptr, pre_ptr, sq_ptr, list_ptr, count_ptr, flag_ptr,
    energy_ptr, dist_ptr, iters_ptr, c_save_ptr, c_dot_ptr, r_save_ptr, trajx_ptr, trajv_ptr,
    t, N, D, T, zero, dt, kappa, tol, min_iterations,
    H: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    HAS_V: tl.constexpr, HAS_EXC: tl.constexpr, USE_KAPPA: tl.constexpr, EARLY_EXIT: tl.constexpr,
    SAVE: tl.constexpr, SAVE_DOT: tl.constexpr, TRAJ: tl.constexpr, FINAL_OUT: tl.constexpr,
    EVEN: tl.constexpr, I32: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Step t of SPEC §2 (formula in the module docstring) for BM rows over all of d: reads
    c = relu(ctx + pre_t) and Σ(x_t - mu)² of its rows, then one pass over the d-blocks updates
    x, v and accumulates, from x', v' in the same pass, pre_{t+1} (in place), Σ(x' - mu)²,
    energy Σv'²/D, distance Σ|x' - mu|/D and ‖x' - x‖². With EARLY_EXIT the rows are entries
    pos < count of the list `list_ptr` (the rows still running, in row order): converged rows
    get iterations = t+1 and flag 0, and `_compact_rows` re-forms the list for step t+1, so a
    converged row costs nothing after its last step. With SAVE, c_t and rms_t for the backward
    (and SAVE_DOT: c_t in the dot dtype as well)."""
    pid = tl.program_id(0)
    pos = pid * BM + tl.arange(0, BM)
    if EARLY_EXIT:
        count = tl.load(count_ptr)
        row_mask = pos < count
        rows = tl.load(list_ptr + pos, mask=row_mask, other=0)
    else:
        count = N
        row_mask = _in_range(pos, N, EVEN)
        rows = pos
    if pid * BM < count:
        rows64 = rows.to(tl.int64)
        hk = tl.arange(0, H)
        h_offs = rows64[:, None] * H + hk[None, :]
        ctx = tl.load(ctx_ptr + h_offs, mask=row_mask[:, None], other=0.0)
        pre = tl.load(pre_ptr + h_offs, mask=row_mask[:, None], other=0.0)
        c = tl.maximum(ctx + pre, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as in torch
        rms = tl.sqrt(tl.load(sq_ptr + rows64, mask=row_mask, other=0.0) / D)
        if SAVE:
            tl.store(c_save_ptr + (t * N + rows64)[:, None] * H + hk[None, :], c, mask=row_mask[:, None])
            tl.store(r_save_ptr + t * N + rows64, rms, mask=row_mask)
            if SAVE_DOT:  # the backward's dots read c in their dtype: half the bytes, no conversion
                tl.store(c_dot_ptr + (t * N + rows64)[:, None] * H + hk[None, :], c.to(DOT), mask=row_mask[:, None])
        if USE_KAPPA:
            alpha_scale = 1.0 - tl.exp(-kappa * rms)
        else:
            alpha_scale = tl.full([BM], 1.0, dtype=ACC)
        ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3 = _load_mod(mod_ptr, ACC)
        pre = tl.zeros([BM, H], dtype=ACC)
        sq = tl.zeros([BM], dtype=ACC)
        dx2 = tl.zeros([BM], dtype=ACC)
        e_sum = tl.zeros([BM], dtype=ACC)
        d_sum = tl.zeros([BM], dtype=ACC)
        for j0 in range(0, D, BD):
            cols = j0 + tl.arange(0, BD)
            col_mask = _in_range(cols, D, EVEN)
            m = row_mask[:, None] & col_mask[None, :]
            if I32:  # N·D < 2³¹: 32-bit offsets hold half the registers of 64-bit ones
                offs = rows[:, None] * D + cols[None, :]
            else:
                offs = rows64[:, None] * D + cols[None, :]
            x, x_new, v_new, mu = _advance_block(
                t, c, alpha_scale, row_mask, rows64, offs, m, cols, col_mask, hk, D, T, dt,
                x0_ptr, v0_ptr, xs_ptr, vs_ptr, xo_ptr, vo_ptr, w_o_ptr, b_o_ptr, mu_ptr, exc_ptr, trajx_ptr,
                trajv_ptr, ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3, H, BM, BD, HAS_V, HAS_EXC, False, TRAJ,
                FINAL_OUT, DOT, PREC, ACC)
            if t + 1 < T:
                pre += _block_preact(x_new, v_new, w_x_ptr, w_v_ptr, cols, col_mask, hk, D, zero, BM, H, True,
                                     DOT, PREC, ACC)
            err_new = tl.where(m, x_new - mu[None, :], 0.0)
            sq += tl.sum(err_new * err_new, axis=1)
            step = x_new - x
            dx2 += tl.sum(step * step, axis=1)
            e_sum += tl.sum(v_new * v_new, axis=1)
            d_sum += tl.sum(tl.abs(err_new), axis=1)
        if t + 1 < T:
            tl.store(pre_ptr + h_offs, pre, mask=row_mask[:, None])
            tl.store(sq_ptr + rows64, sq, mask=row_mask)
        tl.store(energy_ptr + rows64 * T + t, e_sum / D, mask=row_mask)
        tl.store(dist_ptr + rows64 * T + t, d_sum / D, mask=row_mask)
        if EARLY_EXIT:
            steps = tl.zeros([BM], dtype=tl.int32) + t + 1
            converged = row_mask & (tl.sqrt(dx2) < tol) & (steps >= min_iterations)
            tl.store(iters_ptr + rows64, steps, mask=converged)
            tl.store(flag_ptr + rows64, tl.zeros([BM], dtype=tl.int32), mask=converged)


@triton.jit
def _compact_rows(flag_ptr, list_ptr, count_ptr, N, CHUNK: tl.constexpr):
    """list = the rows whose flag is set, in row order; count = how many: the tiles of the
    next step hold only rows still running. One program, a running prefix sum over chunks."""
    base = tl.load(count_ptr) * 0
    for c0 in range(0, N, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        keep = tl.load(flag_ptr + idx, mask=idx < N, other=0)
        pos = base + tl.cumsum(keep, axis=0) - keep
        tl.store(list_ptr + pos, idx, mask=keep != 0)
        base += tl.sum(keep, axis=0)
    tl.store(count_ptr, base)


@triton.jit
def _copy_stopped(xs_ptr, vs_ptr, xo_ptr, vo_ptr, iters_ptr, N, D, T, BM: tl.constexpr, BD: tl.constexpr):
    """The outputs of rows that stopped before the last step (iterations < T), cast from the
    fp32 state; the last step wrote every other row's itself. Rows that ran all T steps are
    masked off, so they cost their iteration count's read and nothing else."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    stopped = (rows < N) & (tl.load(iters_ptr + rows, mask=rows < N, other=T) < T)
    rows64 = rows.to(tl.int64)
    for j0 in range(0, D, BD):
        cols = j0 + tl.arange(0, BD)
        m = stopped[:, None] & (cols < D)[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        tl.store(xo_ptr + offs, tl.load(xs_ptr + offs, mask=m).to(xo_ptr.dtype.element_ty), mask=m)
        tl.store(vo_ptr + offs, tl.load(vs_ptr + offs, mask=m).to(vo_ptr.dtype.element_ty), mask=m)


def _block_shape(d, H, gpu=None, dtype=torch.bfloat16):
    """(BM, BD, num_warps, register cap or None) of both forward paths, a fixed function of the
    shape and dtype: no autotuning, because BD sets the order of the row reductions over d, and a
    configuration picked by timing could differ between processes and break 'same input, same
    bits'. Both paths use the same blocks, so a row meets the same tl.dot instructions (wgmma,
    M = 64 per warp group) and the same block order whichever path its batch size picks.

    Chosen from the static sm_90 compile (benchmarks/kernel_report.py): BD = 16 leaves ptxas
    headroom under 255 registers without spills at 4 warps, i.e. 2 programs (8 warps) per
    multiprocessor, for bf16/fp16 at every H and fp32 at H = 64 (BD = 32 needs ~225 registers in
    bf16 and spills for fp32 and in the early-exit variant); BM = 64 is the smallest wgmma tile.
    fp32 (tf32x3 dots, whose K can be 8):
    * H <= 32: 128 rows over 8 warps (two warp groups of 64) and 8 columns, the tile path capped
      at 128 registers (`_tile_config`): 2 programs a multiprocessor, no spills at H = 32 (20 B
      at H = 16), and the weights re-read per row (6·d·H / BM a step) halve: 22 % fewer bytes a
      row and step than the previous design at d = 2048, H = 32, where 64-row blocks moved 0.6 %
      more. Not at H = 64: capped, 128 rows spill 308-404 B; uncapped, 209-223 registers allow
      one program.
    * H = 128: 64 × 8 over 8 warps: 96-172 B of spills a thread instead of 620-940 at 64 × 16
      over 4 warps, at the same 8 warps a multiprocessor (one program of 8 instead of two of 4;
      nothing fits 2 programs unspilled: kernel_report's note)."""
    if not (gpu if gpu is not None else not interpreting()):  # the interpreter: few, small tiles
        return 16, 32, 4, None
    if dtype == torch.float32 and H <= 32:
        return 128, 8, 8, 128
    if dtype == torch.float32 and H > 64:
        return 64, 8, 8, None
    return 64, 16, 4, None


def _tile_config(d, H, gpu=None, dtype=torch.bfloat16):
    """Launch configuration of the tile path (see `_block_shape`; `gpu`: the GPU's choice even
    under the interpreter, for the kernel report; dtype: the activations')."""
    BM, BD, warps, cap = _block_shape(d, H, gpu, dtype)
    cfg = dict(BM=BM, BD=BD, num_warps=warps, num_stages=1)
    if cap is not None:
        cfg["maxnreg"] = cap
    return cfg


def _decode_config(d, H, gpu=None, dtype=torch.bfloat16):
    """Block sizes of the decode path: the tile path's block shape (the same reduction order and
    dot instructions), NB column blocks per program, so 64 rows × d = 2048 keep 64 programs busy."""
    BM, BD, warps, _ = _block_shape(d, H, gpu, dtype)
    return dict(BM=BM, BD=BD, NB=2, num_warps=warps, num_stages=1)


# ----------------------------------------------------------------------------------------------
# forward, decode path (d split across programs, one launch per step)


@triton.jit(do_not_specialize=["t"])
def _decode_reduce(
    ctx_part_ptr, pre_part_ptr, stat_part_ptr, bias_ptr, ctx_ptr, c_ptr, scale_ptr,
    energy_ptr, dist_ptr, iters_ptr,
    t, N, D, T, NBLK, kappa, tol, min_iterations,
    H: tl.constexpr, BM: tl.constexpr, HC: tl.constexpr, BATCH: tl.constexpr,
    USE_KAPPA: tl.constexpr, EARLY_EXIT: tl.constexpr, ACC: tl.constexpr,
):
    """Launch t (0 <= t <= T) of the decode path's row reductions, for BM rows and hidden units
    hc·HC .. hc·HC + HC-1: adds the NBLK per-block shares of step t-1 (the prologue's at t = 0)
    one block after the other in column order, exactly as the tile path does, and writes what
    step t needs: c = relu(ctx + pre) [N, H] and the alpha scale 1 - exp(-kappa·rms) [N]
    (ctx = Σ shares of h·w_hᵀ + bias, stored at t = 0). Programs with hc = 0 also write step
    t-1's energy and distance and decide its convergence (iterations = t)."""
    pid_m = tl.program_id(0)
    hc = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    if t < T:
        hk = hc * HC + tl.arange(0, HC)
        offs = rows64[:, None] * H + hk[None, :]
        m = row_mask[:, None]
        pre = tl.zeros([BM, HC], dtype=ACC)
        for b0 in range(0, NBLK, BATCH):
            # BATCH independent loads before their adds: the latency is paid once per batch;
            # padding adds -0.0, which leaves every sum (+0.0 too) as it is
            for i in tl.static_range(BATCH):
                mk = m & ((tl.zeros([BM], dtype=tl.int32) + b0 + i) < NBLK)[:, None]
                pre += tl.load(pre_part_ptr + (b0 + i) * N * H + offs, mask=mk, other=-0.0)
        if t == 0:
            ctx = tl.zeros([BM, HC], dtype=ACC)
            for b0 in range(0, NBLK, BATCH):
                for i in tl.static_range(BATCH):
                    mk = m & ((tl.zeros([BM], dtype=tl.int32) + b0 + i) < NBLK)[:, None]
                    ctx += tl.load(ctx_part_ptr + (b0 + i) * N * H + offs, mask=mk, other=-0.0)
            ctx += tl.load(bias_ptr + hk).to(ACC)[None, :]
            tl.store(ctx_ptr + offs, ctx, mask=m)
        else:
            ctx = tl.load(ctx_ptr + offs, mask=m, other=0.0)
        tl.store(c_ptr + offs, tl.maximum(ctx + pre, 0.0, propagate_nan=tl.PropagateNan.ALL), mask=m)
    if hc == 0:
        sq = tl.zeros([BM], dtype=ACC)
        dx2 = tl.zeros([BM], dtype=ACC)
        e_sum = tl.zeros([BM], dtype=ACC)
        d_sum = tl.zeros([BM], dtype=ACC)
        for b0 in range(0, NBLK, BATCH):
            for i in tl.static_range(BATCH):
                mk = row_mask & ((tl.zeros([BM], dtype=tl.int32) + b0 + i) < NBLK)
                base = stat_part_ptr + (b0 + i) * N + rows64
                sq += tl.load(base, mask=mk, other=-0.0)
                if t > 0:
                    dx2 += tl.load(base + NBLK * N, mask=mk, other=-0.0)
                    e_sum += tl.load(base + 2 * NBLK * N, mask=mk, other=-0.0)
                    d_sum += tl.load(base + 3 * NBLK * N, mask=mk, other=-0.0)
        if t > 0:
            tl.store(energy_ptr + rows64 * T + t - 1, e_sum / D, mask=row_mask)
            tl.store(dist_ptr + rows64 * T + t - 1, d_sum / D, mask=row_mask)
            if EARLY_EXIT:
                # a row still running has iterations == T; it stops after t steps
                was_active = row_mask & (tl.load(iters_ptr + rows64, mask=row_mask, other=0) == T)
                steps = tl.zeros([BM], dtype=tl.int32) + t
                converged = was_active & (tl.sqrt(dx2) < tol) & (steps >= min_iterations)
                tl.store(iters_ptr + rows64, steps, mask=converged)
        if t < T:
            if USE_KAPPA:
                scale = 1.0 - tl.exp(-kappa * tl.sqrt(sq / D))
            else:
                scale = tl.full([BM], 1.0, dtype=ACC)
            tl.store(scale_ptr + rows64, scale, mask=row_mask)


@triton.jit(do_not_specialize=["t"])
def _decode_step(
    x0_ptr, v0_ptr, xs_ptr, vs_ptr, xo_ptr, vo_ptr,
    w_x_ptr, w_v_ptr, w_o_ptr, b_o_ptr, mod_ptr, mu_ptr, exc_ptr,
    c_ptr, scale_ptr, pre_part_ptr, stat_part_ptr, iters_ptr, trajx_ptr, trajv_ptr,
    t, N, D, T, NB, NBLK, zero, dt,
    H: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    HAS_V: tl.constexpr, HAS_EXC: tl.constexpr, EARLY_EXIT: tl.constexpr,
    TRAJ: tl.constexpr, FINAL_OUT: tl.constexpr,
    EVEN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Step t of the decode path for BM rows and the NB column blocks blk = g·NB .. (g =
    program_id(1)): reads c and the alpha scale that `_decode_reduce` made, advances x, v on
    its blocks (rows that stopped keep their state) and stores each block's shares for launch
    t+1 of the reduce: pre[blk] = x'·w_xᵀ + v'·w_vᵀ and stat[:, blk] = (Σ(x'-mu)², Σ(x'-x)²,
    Σv'², Σ|x'-mu|). The same block code as the tile path, at the same block sizes."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = _in_range(rows, N, EVEN)
    rows64 = rows.to(tl.int64)
    hk = tl.arange(0, H)
    if EARLY_EXIT:
        active = row_mask & (tl.load(iters_ptr + rows64, mask=row_mask, other=0) == T)
    else:
        active = row_mask
    n_active = tl.sum(active.to(tl.int32), axis=0)
    if n_active > 0:
        c = tl.load(c_ptr + rows64[:, None] * H + hk[None, :], mask=row_mask[:, None], other=0.0)
        alpha_scale = tl.load(scale_ptr + rows64, mask=row_mask, other=0.0)
        ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3 = _load_mod(mod_ptr, ACC)
        for b in range(NB):
            blk = g * NB + b
            cols = blk * BD + tl.arange(0, BD)
            col_mask = _in_range(cols, D, EVEN)
            m = row_mask[:, None] & col_mask[None, :]
            offs = rows64[:, None] * D + cols[None, :]
            x, x_new, v_new, mu = _advance_block(
                t, c, alpha_scale, active, rows64, offs, m, cols, col_mask, hk, D, T, dt,
                x0_ptr, v0_ptr, xs_ptr, vs_ptr, xo_ptr, vo_ptr, w_o_ptr, b_o_ptr, mu_ptr, exc_ptr, trajx_ptr,
                trajv_ptr, ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3, H, BM, BD, HAS_V, HAS_EXC, EARLY_EXIT, TRAJ,
                FINAL_OUT, DOT, PREC, ACC)
            in_d = row_mask & (tl.zeros([BM], dtype=tl.int32) + blk < NBLK)  # the last group may end past d
            if t + 1 < T:
                pre = _block_preact(x_new, v_new, w_x_ptr, w_v_ptr, cols, col_mask, hk, D, zero, BM, H, True, DOT,
                                    PREC, ACC)
                tl.store(pre_part_ptr + (blk * N + rows64)[:, None] * H + hk[None, :], pre, mask=in_d[:, None])
            err_new = tl.where(m, x_new - mu[None, :], 0.0)
            step = x_new - x
            base = stat_part_ptr + blk * N + rows64
            tl.store(base, tl.sum(err_new * err_new, axis=1), mask=in_d)
            tl.store(base + NBLK * N, tl.sum(step * step, axis=1), mask=in_d)
            tl.store(base + 2 * NBLK * N, tl.sum(v_new * v_new, axis=1), mask=in_d)
            tl.store(base + 3 * NBLK * N, tl.sum(tl.abs(err_new), axis=1), mask=in_d)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _replay(x0_ptr, v0_ptr, offs, m, rows64, row_mask, cols, col_mask, hk, mu, t,
            c_dot_ptr, r_save_ptr, w_o_ptr, b_o_ptr, exc_ptr, N, D, dt, kappa,
            ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3,
            H: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_V: tl.constexpr, HAS_EXC: tl.constexpr,
            USE_KAPPA: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """x_t, v_t on one [BM, BD] block, rerun from x_0, v_0 with the saved c_s and rms_s: given
    those, the recurrence is column-local (no row reduction), so any block replays alone."""
    x = _load_block(x0_ptr, offs, m, ACC)
    if HAS_V:
        v = _load_block(v0_ptr, offs, m, ACC)
    else:
        v = tl.zeros([BM, BD], dtype=ACC)
    for s in range(t):
        c = tl.load(c_dot_ptr + (s * N + rows64)[:, None] * H + hk[None, :], mask=row_mask[:, None],
                    other=0.0).to(DOT)
        if USE_KAPPA:
            alpha_scale = 1.0 - tl.exp(-kappa * tl.load(r_save_ptr + s * N + rows64, mask=row_mask, other=0.0))
        else:
            alpha_scale = tl.full([BM], 1.0, dtype=ACC)
        if HAS_EXC:
            exc = tl.load(exc_ptr + s * D + cols, mask=col_mask, other=0.0).to(ACC)
        else:
            exc = tl.zeros([BD], dtype=ACC)
        x, v = _step_block(c, x, v, x - mu[None, :], alpha_scale, exc, w_o_ptr, b_o_ptr, cols, col_mask, hk, D,
                           dt, ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3, H, DOT, PREC, ACC)
    return x, v


@triton.jit
def _step_full(c, x, v, alpha_scale, exc, mu, w_o_ptr, b_o_ptr, cols, col_mask, hk, D, dt,
               ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3,
               H: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """`_step_block` keeping what the gradient needs: (alpha0, beta, zb, gate, v_cand, alpha,
    err, x', v')."""
    cd = c.to(DOT)
    # this order of the four quarters is the one ptxas fits in 255 registers without spills
    # (bwd_rows, bf16, H = 64); the quarters are independent, the arithmetic is the same
    gate = _sigmoid(ms2 * _controller_quarter(cd, w_o_ptr, b_o_ptr, 2, cols, col_mask, hk, D, H, DOT, PREC, ACC)
                    + mb2)
    alpha0 = _sigmoid(ms0 * _controller_quarter(cd, w_o_ptr, b_o_ptr, 0, cols, col_mask, hk, D, H, DOT, PREC, ACC)
                      + mb0)
    v_cand = ms3 * _controller_quarter(cd, w_o_ptr, b_o_ptr, 3, cols, col_mask, hk, D, H, DOT, PREC, ACC) + mb3
    zb = ms1 * _controller_quarter(cd, w_o_ptr, b_o_ptr, 1, cols, col_mask, hk, D, H, DOT, PREC, ACC) + mb1
    beta = _softplus(zb)
    alpha = alpha0 * alpha_scale[:, None]
    err = x - mu[None, :]
    v_new = alpha * v + (1 - alpha) * v_cand - beta * err + exc[None, :]
    x_new = x + dt * gate * v_new
    return alpha0, beta, zb, gate, v_cand, alpha, err, x_new, v_new


@triton.jit
def _upstream(gxT_ptr, gvT_ptr, ge, gd, gx, gv, gpre_next, rc_next, x_new, v_new, mu, offs, m,
              cols, col_mask, hk, w_x_ptr, w_v_ptr, t, T, D,
              HAS_GX: tl.constexpr, HAS_GV: tl.constexpr, HAS_GE: tl.constexpr, HAS_GD: tl.constexpr,
              DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """(dL/dx_{t+1}, dL/dv_{t+1}) on a block: the loss's gradient of x_T, v_T at the last step,
    else the direct part carried back from step t+1 (gx, gv) plus step t+1's terms that need its
    row reductions, added here where x_{t+1} = x' is at hand: gpre_{t+1}·w_x, gpre_{t+1}·w_v and
    rc_{t+1}·(x' - mu) (rms). Plus this step's statistics: energy (ge·v' with ge = 2·gE/D),
    distance (gd·sign with gd = gD/D), the per-row factors loaded once per step by the caller."""
    if t == T - 1:
        if HAS_GX:
            gx = _load_block(gxT_ptr, offs, m, ACC)
        else:
            gx = tl.zeros_like(x_new)
        if HAS_GV:
            gv = _load_block(gvT_ptr, offs, m, ACC)
        else:
            gv = tl.zeros_like(v_new)
    else:
        gpre_d = gpre_next.to(DOT)
        w_x = tl.load(w_x_ptr + hk[:, None] * D + cols[None, :], mask=col_mask[None, :], other=0.0).to(DOT)
        w_v = tl.load(w_v_ptr + hk[:, None] * D + cols[None, :], mask=col_mask[None, :], other=0.0).to(DOT)
        gx = tl.dot(gpre_d, w_x, gx, input_precision=PREC, out_dtype=ACC) + rc_next[:, None] * (x_new - mu[None, :])
        gv = tl.dot(gpre_d, w_v, gv, input_precision=PREC, out_dtype=ACC)
    if HAS_GE:
        gv += ge[:, None] * v_new
    if HAS_GD:
        e = x_new - mu[None, :]
        sign = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0))
        gx += gd[:, None] * sign
    return gx, gv


@triton.jit
def _bwd_rows(
    x0_ptr, v0_ptr, xs_ptr, vs_ptr, gx_ptr, gv_ptr, w_x_ptr, w_v_ptr, w_o_ptr, b_o_ptr, mod_ptr, mu_ptr, exc_ptr,
    c_save_ptr, c_dot_ptr, r_save_ptr, gxT_ptr, gvT_ptr, gE_ptr, gD_ptr, gpre_ptr, gpre_dot_ptr, rc_ptr,
    zs_ptr, gcs_ptr, N, D, T, dt, kappa,
    H: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    HAS_V: tl.constexpr, HAS_EXC: tl.constexpr, USE_KAPPA: tl.constexpr,
    HAS_GX: tl.constexpr, HAS_GV: tl.constexpr, HAS_GE: tl.constexpr, HAS_GD: tl.constexpr,
    LAST_SAVED: tl.constexpr, SAVE_DOT: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr, DEFER: tl.constexpr, DC: tl.constexpr, REREAD: tl.constexpr,
):
    """Backward phase 1, one program per BM rows, t = T-1 .. 0: the parts of the reverse
    recurrence that reduce over a row. Per step, one pass over the d-blocks gets the block's
    state x_t, v_t (LAST_SAVED at t = T-1: the forward's fp32 state (xs, vs), which its last
    step left at x_{T-1}, v_{T-1}; else replayed from x_0, v_0 by `_replay`), pulls the upstream
    gradient (gx', gv') = (dL/dx', dL/dv') through the step, elementwise,

        gv~ = gv' + gx'·dt·gate                                  (x' = x + dt·gate·v')
        g_alpha = gv~·(v - v_cand),  g_za = g_alpha·f·alpha0·(1 - alpha0)   (f = 1 - exp(-kappa·rms))
        g_zb = -gv~·err·sigmoid(zb),  g_zg = gx'·dt·v'·gate·(1 - gate),  g_vc = gv~·(1 - alpha)
        gx (direct) = gx' - gv~·beta,  gv (direct) = gv~·alpha

    and accumulates dL/dc_t = Σ_q ms_q·g_zq·w_o[q] (tl.dot) and dL/df_t = Σ_j g_alpha·alpha0. Then

        gpre_t = dL/dc_t · [c_t > 0]                      -> gpre [T, N, H]
        rc_t   = dL/df_t · kappa·exp(-kappa·rms_t) / (D·rms_t)   (d rms/d err = err/(D·rms))  -> rc [T, N]

    The direct gradients (gx, gv) of x_t, v_t go to the fp32 carry (gx, gv) [N, D] for step
    t-1, which adds step t's row-coupled terms (`_upstream`). With LAST_SAVED the carry is the
    forward's state buffer itself: read at t = T-1, then overwritten block by block.

    DEFER (`_defer_bwd_rows`): the [BM, H] fp32 accumulator of dL/dc, live through the whole
    pass over d, does not fit beside the step's tiles at H = 128 or in fp32 (it spills). With
    DEFER the pass parks the four ms_q·g_zq blocks (dot dtype, as the dots take them) in the
    program's slice of a scratch `zs` [4, BM, DC], and every DC columns a short loop runs the
    same dots in the same order (blocks ascending, quarters 2, 0, 1, 3) into the accumulator,
    which waits between chunks in the program's slot of `gcs` [BM, H] fp32: the same sums, the
    same bits. REREAD (H = 128): c_t and gpre_{t+1}, held as dot operands through the pass, do
    not fit either; they are read again per block, where the dots take them (the program's own
    tiles, from L1)."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_mask = _in_range(rows, N, EVEN)
    rows64 = rows.to(tl.int64)
    hk = tl.arange(0, H)
    ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3 = _load_mod(mod_ptr, ACC)
    # [N, D] tensors through the tile's base pointer and int32 offsets inside the tile: a
    # 64-bit offset per element would hold twice the registers through the loops
    tile0 = (pid * BM).to(tl.int64) * D
    x0_ptr += tile0
    v0_ptr += tile0
    xs_ptr += tile0
    vs_ptr += tile0
    gx_ptr += tile0
    gv_ptr += tile0
    gxT_ptr += tile0
    gvT_ptr += tile0
    rloc = tl.arange(0, BM)
    h_loc = rloc[:, None] * H + hk[None, :]
    if DEFER:
        zs_ptr += pid.to(tl.int64) * (4 * BM * DC)
        gcs_ptr += pid.to(tl.int64) * (BM * H)
        z_loc = rloc[:, None] * DC + tl.arange(0, BD)[None, :]
    rc_next = tl.zeros([BM], dtype=ACC)
    for tt in range(T):
        t = T - 1 - tt
        c_offs = (t * N + pid * BM).to(tl.int64) * H + h_loc
        # step t+1's gpre, as this program stored it (read back rather than held in registers:
        # the dots take it from shared memory); zeros at t = T-1, where it is not used
        later = row_mask & (tl.zeros([BM], dtype=tl.int32) + t + 1 < T)
        if not REREAD:  # else both are read again per block, where used (L1)
            gpre_next = tl.load(gpre_dot_ptr + c_offs + N * H, mask=later[:, None], other=0.0).to(DOT)
            # the dots take c in their dtype; only the relu mask below needs it in fp32
            c = tl.load(c_dot_ptr + c_offs, mask=row_mask[:, None], other=0.0).to(DOT)
        rms = tl.load(r_save_ptr + t * N + rows64, mask=row_mask, other=0.0)
        # the statistics' upstream gradients of this step, per row
        if HAS_GE:
            ge = tl.load(gE_ptr + rows64 * T + t, mask=row_mask, other=0.0).to(ACC) * 2.0 / D
        else:
            ge = rms
        if HAS_GD:
            gd = tl.load(gD_ptr + rows64 * T + t, mask=row_mask, other=0.0).to(ACC) / D
        else:
            gd = rms
        if USE_KAPPA:
            alpha_scale = 1.0 - tl.exp(-kappa * rms)
        else:
            alpha_scale = tl.full([BM], 1.0, dtype=ACC)
        if not DEFER:  # else parked in gcs between chunks
            gc = tl.zeros([BM, H], dtype=ACC)
        gf = tl.zeros([BM], dtype=ACC)
        for j0 in range(0, D, BD):
            cols = j0 + tl.arange(0, BD)
            col_mask = _in_range(cols, D, EVEN)
            m = row_mask[:, None] & col_mask[None, :]
            offs = rloc[:, None] * D + cols[None, :]
            mu = tl.load(mu_ptr + cols, mask=col_mask, other=0.0).to(ACC)
            if HAS_EXC:
                exc = tl.load(exc_ptr + t * D + cols, mask=col_mask, other=0.0).to(ACC)
            else:
                exc = tl.zeros([BD], dtype=ACC)
            if LAST_SAVED:
                if t == T - 1:
                    x = _load_block(xs_ptr, offs, m, ACC)
                    v = _load_block(vs_ptr, offs, m, ACC)
                else:
                    x, v = _replay(x0_ptr, v0_ptr, offs, m, rows64, row_mask, cols, col_mask, hk, mu, t, c_dot_ptr,
                                   r_save_ptr, w_o_ptr, b_o_ptr, exc_ptr, N, D, dt, kappa, ms0, ms1, ms2, ms3, mb0,
                                   mb1, mb2, mb3, H, BM, BD, HAS_V, HAS_EXC, USE_KAPPA, DOT, PREC, ACC)
            else:
                x, v = _replay(x0_ptr, v0_ptr, offs, m, rows64, row_mask, cols, col_mask, hk, mu, t, c_dot_ptr,
                               r_save_ptr, w_o_ptr, b_o_ptr, exc_ptr, N, D, dt, kappa, ms0, ms1, ms2, ms3, mb0, mb1,
                               mb2, mb3, H, BM, BD, HAS_V, HAS_EXC, USE_KAPPA, DOT, PREC, ACC)
            if REREAD:
                c = tl.load(c_dot_ptr + c_offs, mask=row_mask[:, None], other=0.0).to(DOT)
            alpha0, beta, zb, gate, v_cand, _, err, x_new, v_new = _step_full(
                c, x, v, alpha_scale, exc, mu, w_o_ptr, b_o_ptr, cols, col_mask, hk, D, dt,
                ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3, H, DOT, PREC, ACC)
            if t == T - 1:
                gx = tl.zeros([BM, BD], dtype=ACC)
                gv = tl.zeros([BM, BD], dtype=ACC)
            else:
                gx = _load_block(gx_ptr, offs, m, ACC)
                gv = _load_block(gv_ptr, offs, m, ACC)
            if REREAD:
                gpre_next = tl.load(gpre_dot_ptr + c_offs + N * H, mask=later[:, None], other=0.0).to(DOT)
            gx, gv = _upstream(gxT_ptr, gvT_ptr, ge, gd, gx, gv, gpre_next, rc_next, x_new, v_new, mu,
                               offs, m, cols, col_mask, hk, w_x_ptr, w_v_ptr, t, T, D,
                               HAS_GX, HAS_GV, HAS_GE, HAS_GD, DOT, PREC, ACC)
            # through the step (formulas in the docstring), each piece into dL/dc once made
            gx = tl.where(m, gx, 0.0)
            gv = tl.where(m, gv, 0.0)
            gvt = gv + gx * dt * gate
            g_zg = gx * dt * v_new * gate * (1 - gate)
            if DEFER:
                z_at = zs_ptr + (j0 % DC) + z_loc
                tl.store(z_at + 2 * BM * DC, (g_zg * ms2).to(DOT))
            else:
                gc = tl.dot((g_zg * ms2).to(DOT), _load_w_out_rows(w_o_ptr, 2, cols, col_mask, hk, D, H, DOT), gc,
                            input_precision=PREC, out_dtype=ACC)
            g_alpha = gvt * (v - v_cand)
            if USE_KAPPA:
                gf += tl.sum(g_alpha * alpha0, axis=1)
            g_za = g_alpha * alpha_scale[:, None] * alpha0 * (1 - alpha0)
            if DEFER:
                tl.store(z_at, (g_za * ms0).to(DOT))
            else:
                gc = tl.dot((g_za * ms0).to(DOT), _load_w_out_rows(w_o_ptr, 0, cols, col_mask, hk, D, H, DOT), gc,
                            input_precision=PREC, out_dtype=ACC)
            g_zb = -gvt * err * _sigmoid(zb)
            if DEFER:
                tl.store(z_at + BM * DC, (g_zb * ms1).to(DOT))
            else:
                gc = tl.dot((g_zb * ms1).to(DOT), _load_w_out_rows(w_o_ptr, 1, cols, col_mask, hk, D, H, DOT), gc,
                            input_precision=PREC, out_dtype=ACC)
            alpha = alpha0 * alpha_scale[:, None]
            g_vc = gvt * (1 - alpha)
            if DEFER:
                tl.store(z_at + 3 * BM * DC, (g_vc * ms3).to(DOT))
            else:
                gc = tl.dot((g_vc * ms3).to(DOT), _load_w_out_rows(w_o_ptr, 3, cols, col_mask, hk, D, H, DOT), gc,
                            input_precision=PREC, out_dtype=ACC)
            gx_direct = gx - gvt * beta
            gv_direct = gvt * alpha
            if t > 0:
                if LAST_SAVED:
                    if t == T - 1:
                        # the carry goes where this block's state was read, by other threads
                        tl.debug_barrier()
                tl.store(gx_ptr + offs, gx_direct, mask=m)
                tl.store(gv_ptr + offs, gv_direct, mask=m)
            if DEFER:
                if ((j0 + BD) % DC == 0) | (j0 + BD >= D):
                    # the chunk's parked blocks into dL/dc (written by other threads: a barrier
                    # first, and another before the next chunk overwrites them)
                    tl.debug_barrier()
                    c0 = j0 - j0 % DC
                    first = (tl.zeros([BM, H], dtype=tl.int32) + c0) > 0
                    gk = tl.load(gcs_ptr + h_loc, mask=first, other=0.0)
                    for k0 in range(c0, j0 + BD, BD):
                        kcols = k0 + tl.arange(0, BD)
                        kmask = _in_range(kcols, D, EVEN)
                        k_at = zs_ptr + (k0 - c0) + z_loc
                        gk = tl.dot(tl.load(k_at + 2 * BM * DC), _load_w_out_rows(w_o_ptr, 2, kcols, kmask, hk, D, H,
                                                                                  DOT), gk,
                                    input_precision=PREC, out_dtype=ACC)
                        gk = tl.dot(tl.load(k_at), _load_w_out_rows(w_o_ptr, 0, kcols, kmask, hk, D, H, DOT), gk,
                                    input_precision=PREC, out_dtype=ACC)
                        gk = tl.dot(tl.load(k_at + BM * DC), _load_w_out_rows(w_o_ptr, 1, kcols, kmask, hk, D, H, DOT),
                                    gk, input_precision=PREC, out_dtype=ACC)
                        gk = tl.dot(tl.load(k_at + 3 * BM * DC), _load_w_out_rows(w_o_ptr, 3, kcols, kmask, hk, D, H,
                                                                                  DOT), gk,
                                    input_precision=PREC, out_dtype=ACC)
                    tl.store(gcs_ptr + h_loc, gk)
                    tl.debug_barrier()
        if DEFER:
            gc = tl.load(gcs_ptr + h_loc)
        c_full = tl.load(c_save_ptr + c_offs, mask=row_mask[:, None], other=0.0)
        gpre = tl.where(c_full > 0, gc, 0.0)
        tl.store(gpre_ptr + c_offs, gpre, mask=row_mask[:, None])
        # phase 2's dots (and step t-1 here) read gpre in their dtype
        tl.store(gpre_dot_ptr + c_offs, gpre.to(DOT), mask=row_mask[:, None])
        if USE_KAPPA:
            g_rms = gf * kappa * tl.exp(-kappa * rms)
            rc = tl.where(rms > 0, g_rms / (D * tl.where(rms > 0, rms, 1.0)), 0.0)
        else:
            rc = tl.zeros([BM], dtype=ACC)
        tl.store(rc_ptr + t * N + rows64, rc, mask=row_mask)
        rc_next = rc
        # step t-1 reads the carry that this program's other threads wrote
        tl.debug_barrier()


@triton.jit
def _z_at(cd, w_o_tile, zb_q, ms_q, PREC: tl.constexpr, ACC: tl.constexpr):
    """z_q = ms_q·(cd·w_o_qᵀ + b_o_q) + mb_q on a block whose weight tile is at hand, as
    ms_q·(cd·w_o_qᵀ) + zb_q with zb_q = ms_q·b_o_q + mb_q per column: no bias tile rides in the
    dot's accumulator (which, loop-invariant, would stay in registers for the whole program).
    It rounds differently from the forward's order, by an ulp: the backward's replay is not
    bit-identical to the forward, which only a gradient's last bits could notice."""
    return ms_q * tl.dot(cd, w_o_tile, input_precision=PREC, out_dtype=ACC) + zb_q[None, :]


@triton.jit
def _held(tile, w_ptr, q: tl.constexpr, cols, col_mask, hk, D, H: tl.constexpr, DOT: tl.constexpr,
          RELOAD: tl.constexpr):
    """A weight tile of `_bwd_cols` as the [H, BD] operand: the one loaded at the program's start
    (`tile`), or with RELOAD read again here, where the dot takes it (q: w_o's quarter, or -1 for
    w_x / w_v themselves)."""
    if RELOAD:
        if q < 0:
            w = tl.load(w_ptr + hk[:, None] * D + cols[None, :], mask=col_mask[None, :], other=0.0).to(DOT)
        else:
            w = _load_w_out(w_ptr, q, cols, col_mask, hk, D, H, DOT)
    else:
        w = tile
    return w


@triton.jit
def _bwd_cols(
    x0_ptr, v0_ptr, w_x_ptr, w_v_ptr, w_o_ptr, b_o_ptr, mod_ptr, mu_ptr, exc_ptr, c_dot_ptr, r_save_ptr,
    gxT_ptr, gvT_ptr, gE_ptr, gD_ptr, gpre_dot_ptr, rc_ptr, dx_ptr, dv_ptr, replay_ptr, gq_ptr,
    pwo_ptr, dz_ptr, dwx_ptr, dwv_ptr, dmu_ptr, dtab_ptr,
    N, D, T, dt, kappa, SPLITS,
    H: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, TP: tl.constexpr,
    HAS_V: tl.constexpr, HAS_EXC: tl.constexpr, USE_KAPPA: tl.constexpr,
    HAS_GX: tl.constexpr, HAS_GV: tl.constexpr, HAS_GE: tl.constexpr, HAS_GD: tl.constexpr,
    EVEN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, RELOAD_W: tl.constexpr,
):
    """Backward phase 2, one program per (BD columns, row split): with gpre_t and rc_t known,
    the whole reverse recurrence is column-local, so each program reruns it for its columns
    over the row tiles of its split (tiles split, split + SPLITS, ...) and writes dL/dx_0,
    dL/dv_0 and its split's partial sums

        P_q[q·D + j]  += Σ_t g_zq,tᵀ·c_t     dz[q·D + j]   += Σ g_zq,t       (z_q = ms_q·q + mb_q)
        dw_x[:, j]    += Σ_t gpre_tᵀ·x_t     dw_v[:, j]    += Σ_t gpre_tᵀ·v_t
        dmu[j]        -= Σ (every gradient that reached err = x - mu)
        dtable[t, j]  += Σ_rows gv~_t

    from which torch makes dw_o = ms_q·P_q, db_o = ms_q·dz, d mod_bias_q = Σ dz_q and, since
    q = c·w_oᵀ + b_o, d mod_scale_q = Σ g_zq·q = ⟨w_o_q, P_q⟩ + ⟨b_o_q, dz_q⟩.

    Per tile, three passes over its own slice of two scratch buffers (the running programs'
    slices stay in L2): the forward replayed once (x_t, v_t, t = 1 .. T-1, fp32, into `replay`),
    adding gpre_tᵀ·x_t, gpre_tᵀ·v_t to dw_x, dw_v on the way; the reverse recurrence,
    t = T-1 .. 0, carrying (gx, gv) in registers and parking the four dL/dz_q of every step in
    `gq` (dot dtype); then dw_o's share, [H, BD] = c_tᵀ·g_q, and the dz sums. The weight
    gradients accumulate transposed (M = H rows for the tensor cores) in the program's own
    slots of P, dw_x, dw_v, read and written once per tile, so the recurrence runs without six
    accumulators in registers (register pressure: it spills with them). The
    program's weight tiles are loaded once. Partials are summed over splits by torch in a
    fixed order: no atomics, same bits every run."""
    jb = tl.program_id(0)
    sp = tl.program_id(1)
    cols = jb * BD + tl.arange(0, BD)
    col_mask = _in_range(cols, D, EVEN)
    hk = tl.arange(0, H)
    tk = tl.arange(0, TP)
    ms0, ms1, ms2, ms3, mb0, mb1, mb2, mb3 = _load_mod(mod_ptr, ACC)
    mu = tl.load(mu_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    if RELOAD_W:
        # H = 128 in 2-byte dtypes: six [H, BD] tiles held through the program (each warp holds
        # the whole B operand) spill; read where used instead, from L1 (the program's own tiles)
        w_a = w_o_ptr
        w_b = w_o_ptr
        w_g = w_o_ptr
        w_u = w_o_ptr
        w_x = w_x_ptr
        w_v = w_v_ptr
    else:
        w_a = _load_w_out(w_o_ptr, 0, cols, col_mask, hk, D, H, DOT)
        w_b = _load_w_out(w_o_ptr, 1, cols, col_mask, hk, D, H, DOT)
        w_g = _load_w_out(w_o_ptr, 2, cols, col_mask, hk, D, H, DOT)
        w_u = _load_w_out(w_o_ptr, 3, cols, col_mask, hk, D, H, DOT)
        w_x = tl.load(w_x_ptr + hk[:, None] * D + cols[None, :], mask=col_mask[None, :], other=0.0).to(DOT)
        w_v = tl.load(w_v_ptr + hk[:, None] * D + cols[None, :], mask=col_mask[None, :], other=0.0).to(DOT)
    zb_a = ms0 * tl.load(b_o_ptr + cols, mask=col_mask, other=0.0).to(ACC) + mb0
    zb_b = ms1 * tl.load(b_o_ptr + D + cols, mask=col_mask, other=0.0).to(ACC) + mb1
    zb_g = ms2 * tl.load(b_o_ptr + 2 * D + cols, mask=col_mask, other=0.0).to(ACC) + mb2
    zb_u = ms3 * tl.load(b_o_ptr + 3 * D + cols, mask=col_mask, other=0.0).to(ACC) + mb3
    BLOCK: tl.constexpr = BM * BD
    prog = (sp * tl.num_programs(0) + jb).to(tl.int64)
    replay = replay_ptr + prog * (2 * (T - 1) * BLOCK)
    gq = gq_ptr + prog * (4 * T * BLOCK)
    here = tl.arange(0, BM)[:, None] * BD + tl.arange(0, BD)[None, :]
    # [N, D] tensors through each tile's base pointer and int32 offsets inside the tile
    rloc = tl.arange(0, BM)
    offs = rloc[:, None] * D + cols[None, :]
    h_loc = rloc[:, None] * H + hk[None, :]
    # the program's slots of the weight-gradient partials (zeroed by the launcher)
    wo_at = pwo_ptr + (sp * 4 * D + cols[None, :]).to(tl.int64) * H + hk[:, None]
    wx_at = (sp * H + hk[:, None]).to(tl.int64) * D + cols[None, :]
    # the column sums in two small tiles rather than one [BD] vector each (a [BD] vector is
    # copied into every thread that holds its columns): rows 0-3 Σ g_za, g_zb, g_zg, g_vc
    # (dz), row 4 dmu; dtab[t] = Σ gv~_t
    rk = tl.arange(0, 8)
    sums = tl.zeros([8, BD], dtype=ACC)
    dtab = tl.zeros([TP, BD], dtype=ACC)
    for tile in range(sp, tl.cdiv(N, BM), SPLITS):
        rows = tile * BM + tl.arange(0, BM)
        row_mask = _in_range(rows, N, EVEN)
        rows64 = rows.to(tl.int64)
        m = row_mask[:, None] & col_mask[None, :]
        tile0 = tl.cast(tile, tl.int64) * BM * D
        x0_t = x0_ptr + tile0
        v0_t = v0_ptr + tile0
        # 1. the forward once, its states kept for the reverse walk (after the previous tile's
        # reads of the same scratch, by other threads, are done), and dw_x, dw_v on the way
        tl.debug_barrier()
        x = _load_block(x0_t, offs, m, ACC)
        if HAS_V:
            v = _load_block(v0_t, offs, m, ACC)
        else:
            v = tl.zeros([BM, BD], dtype=ACC)
        dwx = tl.load(dwx_ptr + wx_at, mask=col_mask[None, :], other=0.0)
        dwv = tl.load(dwv_ptr + wx_at, mask=col_mask[None, :], other=0.0)
        for s in range(T - 1):
            h_offs = (tl.cast(tile, tl.int64) * BM + s * N) * H + h_loc
            gpre_t = tl.trans(tl.load(gpre_dot_ptr + h_offs, mask=row_mask[:, None], other=0.0).to(DOT))
            dwx = tl.dot(gpre_t, x.to(DOT), dwx, input_precision=PREC, out_dtype=ACC)
            dwv = tl.dot(gpre_t, v.to(DOT), dwv, input_precision=PREC, out_dtype=ACC)
            cd = tl.load(c_dot_ptr + h_offs, mask=row_mask[:, None], other=0.0).to(DOT)
            if USE_KAPPA:
                scale = 1.0 - tl.exp(-kappa * tl.load(r_save_ptr + s * N + rows64, mask=row_mask, other=0.0))
            else:
                scale = tl.full([BM], 1.0, dtype=ACC)
            if HAS_EXC:
                exc = tl.load(exc_ptr + s * D + cols, mask=col_mask, other=0.0).to(ACC)
            else:
                exc = tl.zeros([BD], dtype=ACC)
            # `_step_block`'s step
            alpha = _sigmoid(_z_at(cd, _held(w_a, w_o_ptr, 0, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                                   zb_a, ms0, PREC, ACC)) * scale[:, None]
            v_cand = _z_at(cd, _held(w_u, w_o_ptr, 3, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                           zb_u, ms3, PREC, ACC)
            v_next = alpha * v + (1 - alpha) * v_cand
            beta = _softplus(_z_at(cd, _held(w_b, w_o_ptr, 1, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                                   zb_b, ms1, PREC, ACC))
            v_next = v_next - beta * (x - mu[None, :]) + exc[None, :]
            gate = _sigmoid(_z_at(cd, _held(w_g, w_o_ptr, 2, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                                  zb_g, ms2, PREC, ACC))
            x = x + dt * gate * v_next
            v = v_next
            tl.store(replay + (2 * s) * BLOCK + here, x)
            tl.store(replay + (2 * s + 1) * BLOCK + here, v)
        gpre_t = tl.trans(tl.load(gpre_dot_ptr + (tl.cast(tile, tl.int64) * BM + (T - 1) * N) * H + h_loc,
                                  mask=row_mask[:, None], other=0.0).to(DOT))
        dwx = tl.dot(gpre_t, x.to(DOT), dwx, input_precision=PREC, out_dtype=ACC)
        dwv = tl.dot(gpre_t, v.to(DOT), dwv, input_precision=PREC, out_dtype=ACC)
        tl.store(dwx_ptr + wx_at, dwx, mask=col_mask[None, :])
        tl.store(dwv_ptr + wx_at, dwv, mask=col_mask[None, :])
        tl.debug_barrier()
        # 2. the reverse recurrence
        gx = tl.zeros([BM, BD], dtype=ACC)
        gv = tl.zeros([BM, BD], dtype=ACC)
        rc_next = tl.zeros([BM], dtype=ACC)
        for tt in range(T):
            t = T - 1 - tt
            if t == 0:
                x = _load_block(x0_t, offs, m, ACC)
                if HAS_V:
                    v = _load_block(v0_t, offs, m, ACC)
                else:
                    v = tl.zeros([BM, BD], dtype=ACC)
            else:
                x = tl.load(replay + (2 * t - 2) * BLOCK + here)
                v = tl.load(replay + (2 * t - 1) * BLOCK + here)
            h_offs = (tl.cast(tile, tl.int64) * BM + t * N) * H + h_loc
            cd = tl.load(c_dot_ptr + h_offs, mask=row_mask[:, None], other=0.0).to(DOT)
            if USE_KAPPA:
                alpha_scale = 1.0 - tl.exp(-kappa * tl.load(r_save_ptr + t * N + rows64, mask=row_mask, other=0.0))
            else:
                alpha_scale = tl.full([BM], 1.0, dtype=ACC)
            if HAS_EXC:
                exc = tl.load(exc_ptr + t * D + cols, mask=col_mask, other=0.0).to(ACC)
            else:
                exc = tl.zeros([BD], dtype=ACC)
            # the step again, keeping only what its gradient takes: err, v - v_cand, alpha0,
            # beta, sigmoid(zb), gate, v' (x itself is not needed past err)
            alpha0 = _sigmoid(_z_at(cd, _held(w_a, w_o_ptr, 0, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                                    zb_a, ms0, PREC, ACC))
            err = x - mu[None, :]
            v_cand = _z_at(cd, _held(w_u, w_o_ptr, 3, cols, col_mask, hk, D, H, DOT, RELOAD_W), zb_u, ms3, PREC, ACC)
            alpha = alpha0 * alpha_scale[:, None]
            v_new = alpha * v + (1 - alpha) * v_cand
            dvc = v - v_cand
            beta, sig_b = _softplus_sigmoid(_z_at(cd, _held(w_b, w_o_ptr, 1, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                                                  zb_b, ms1, PREC, ACC))
            v_new = v_new - beta * err + exc[None, :]
            gate = _sigmoid(_z_at(cd, _held(w_g, w_o_ptr, 2, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                                  zb_g, ms2, PREC, ACC))
            e_new = tl.where(m, err + dt * gate * v_new, 0.0)  # x' - mu
            # (dL/dx', dL/dv'): the loss at t = T-1, else the carry plus step t+1's row-coupled terms
            if t == T - 1:
                if HAS_GX:
                    gx = _load_block(gxT_ptr + tile0, offs, m, ACC)
                if HAS_GV:
                    gv = _load_block(gvT_ptr + tile0, offs, m, ACC)
            else:
                gpre_d = tl.load(gpre_dot_ptr + h_offs + N * H, mask=row_mask[:, None], other=0.0).to(DOT)
                gx = tl.dot(gpre_d, _held(w_x, w_x_ptr, -1, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                            gx, input_precision=PREC, out_dtype=ACC) + rc_next[:, None] * e_new
                gv = tl.dot(gpre_d, _held(w_v, w_v_ptr, -1, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                            gv, input_precision=PREC, out_dtype=ACC)
            # what reached x' - mu through step t+1's rms (and through err, beta·err, below)
            dmu = -rc_next[:, None] * e_new
            if HAS_GE:
                gv += (tl.load(gE_ptr + rows64 * T + t, mask=row_mask, other=0.0).to(ACC) * 2.0 / D)[:, None] * v_new
            if HAS_GD:
                sign = tl.where(e_new > 0, 1.0, tl.where(e_new < 0, -1.0, 0.0))
                g_dist = (tl.load(gD_ptr + rows64 * T + t, mask=row_mask, other=0.0).to(ACC) / D)[:, None] * sign
                gx += g_dist
                dmu -= g_dist
            gx = tl.where(m, gx, 0.0)
            gv = tl.where(m, gv, 0.0)
            # through the step (see `_bwd_rows`); the four dL/dz_q go to the scratch for pass 3
            # (dot dtype), the table's and mu's column sums are taken here
            at = gq + (4 * t) * BLOCK + here
            gvt = gv + gx * dt * gate
            g_zg = gx * dt * v_new * gate * (1 - gate)
            tl.store(at + 2 * BLOCK, g_zg.to(DOT))
            g_za = gvt * dvc * alpha_scale[:, None] * alpha0 * (1 - alpha0)
            tl.store(at, g_za.to(DOT))
            g_zb = -gvt * err * sig_b
            tl.store(at + BLOCK, g_zb.to(DOT))
            alpha = alpha0 * alpha_scale[:, None]
            g_vc = gvt * (1 - alpha)
            tl.store(at + 3 * BLOCK, g_vc.to(DOT))
            sums = tl.where(rk[:, None] == 4, sums + tl.sum(dmu + gvt * beta, axis=0)[None, :], sums)
            dtab = tl.where(tk[:, None] == t, dtab + tl.sum(gvt, axis=0)[None, :], dtab)
            gx = gx - gvt * beta
            gv = gvt * alpha
            rc_next = tl.load(rc_ptr + t * N + rows64, mask=row_mask, other=0.0)
        # step 0's own row-coupled terms: they land on x_0, v_0
        x0 = _load_block(x0_t, offs, m, ACC)
        e0 = tl.where(m, x0 - mu[None, :], 0.0)
        gpre_d = tl.load(gpre_dot_ptr + tl.cast(tile, tl.int64) * BM * H + h_loc, mask=row_mask[:, None],
                         other=0.0).to(DOT)
        gx = tl.dot(gpre_d, _held(w_x, w_x_ptr, -1, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                    gx, input_precision=PREC, out_dtype=ACC) + rc_next[:, None] * e0
        sums = tl.where(rk[:, None] == 4, sums - tl.sum(rc_next[:, None] * e0, axis=0)[None, :], sums)
        tl.store(dx_ptr + tile0 + offs, gx.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_V:
            gv = tl.dot(gpre_d, _held(w_v, w_v_ptr, -1, cols, col_mask, hk, D, H, DOT, RELOAD_W),
                        gv, input_precision=PREC, out_dtype=ACC)
            tl.store(dv_ptr + tile0 + offs, gv.to(dv_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()
        # 3. dw_o of this tile (P), and the dz column sums, into the program's partial slots
        dwo_a = tl.load(wo_at, mask=col_mask[None, :], other=0.0)
        dwo_b = tl.load(wo_at + D * H, mask=col_mask[None, :], other=0.0)
        dwo_g = tl.load(wo_at + 2 * D * H, mask=col_mask[None, :], other=0.0)
        dwo_u = tl.load(wo_at + 3 * D * H, mask=col_mask[None, :], other=0.0)
        for t in range(T):
            h_offs = (tl.cast(tile, tl.int64) * BM + t * N) * H + h_loc
            ct = tl.trans(tl.load(c_dot_ptr + h_offs, mask=row_mask[:, None], other=0.0).to(DOT))
            at = gq + (4 * t) * BLOCK + here
            g = tl.load(at).to(DOT)
            dwo_a = tl.dot(ct, g, dwo_a, input_precision=PREC, out_dtype=ACC)
            sums = tl.where(rk[:, None] == 0, sums + tl.sum(g.to(ACC), axis=0)[None, :], sums)
            g = tl.load(at + BLOCK).to(DOT)
            dwo_b = tl.dot(ct, g, dwo_b, input_precision=PREC, out_dtype=ACC)
            sums = tl.where(rk[:, None] == 1, sums + tl.sum(g.to(ACC), axis=0)[None, :], sums)
            g = tl.load(at + 2 * BLOCK).to(DOT)
            dwo_g = tl.dot(ct, g, dwo_g, input_precision=PREC, out_dtype=ACC)
            sums = tl.where(rk[:, None] == 2, sums + tl.sum(g.to(ACC), axis=0)[None, :], sums)
            g = tl.load(at + 3 * BLOCK).to(DOT)
            dwo_u = tl.dot(ct, g, dwo_u, input_precision=PREC, out_dtype=ACC)
            sums = tl.where(rk[:, None] == 3, sums + tl.sum(g.to(ACC), axis=0)[None, :], sums)
        tl.store(wo_at, dwo_a, mask=col_mask[None, :])
        tl.store(wo_at + D * H, dwo_b, mask=col_mask[None, :])
        tl.store(wo_at + 2 * D * H, dwo_g, mask=col_mask[None, :])
        tl.store(wo_at + 3 * D * H, dwo_u, mask=col_mask[None, :])

    tl.store(dz_ptr + (sp * 4 + rk[:, None]) * D + cols[None, :], sums, mask=(rk[:, None] < 4) & col_mask[None, :])
    tl.store(dmu_ptr + sp * D + rk[:, None] * 0 + cols[None, :], sums, mask=(rk[:, None] == 4) & col_mask[None, :])
    tl.store(dtab_ptr + (sp * T + tk[:, None]).to(tl.int64) * D + cols[None, :], dtab,
             mask=(tk[:, None] < T) & col_mask[None, :])


# ----------------------------------------------------------------------------------------------
# launcher


def _traced() -> bool:
    """Whether the kernels launched now are being traced (torch.compile, a fake or functional
    mode) rather than run. A register cap (`maxnreg`, `_tile_config`) then stays out of the
    traced launch: Triton takes it as a launch option, torch's graph of user kernels carries
    only num_warps and num_stages. It changes no result, only how ptxas allocates registers."""
    modes = torch._C._TorchDispatchModeKey
    return (torch.compiler.is_compiling() or torch._C._get_dispatch_mode(modes.FAKE) is not None
            or torch._C._get_dispatch_mode(modes.FUNCTIONAL) is not None)


def _dot_types(dtype):
    """(DOT, PREC, ACC) for an activation dtype; see the module docstring."""
    if dtype == torch.float64:
        return tl.float64, "ieee", tl.float64
    if dtype == torch.float16:
        return tl.float16, "ieee", tl.float32
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16, "ieee", tl.float32
    return tl.float32, ("ieee" if interpreting() else "tf32x3"), tl.float32


def _forward(h, x, v, w_h, w_x, w_v, w_o, b_o, bias, mod, mu, table, dt, kappa, T, tol, min_iterations,
             save=False, trajectory=False, path=None, config=None):
    """Launches the forward. Returns x_T, v_T, energy, distance, iterations, trajectory (x, v)
    or (None, None), the fp32 state (xs, vs) (which holds x_{T-1}, v_{T-1} when the last step
    wrote the outputs directly), and with `save` the per-step controller hidden c [T, N, H]
    (fp32, and in the dot dtype) and rms [T, N]."""
    n, d = x.shape
    H = w_h.shape[0]
    dev, out_dtype = x.device, x.dtype
    acc = compute_dtype(out_dtype)
    DOT, PREC, ACC = _dot_types(out_dtype)
    cast_out = out_dtype != acc
    early_exit = tol is not None
    if path is None:
        path = "decode" if (n <= DECODE_MAX_ROWS and not save) else "tile"
    if path not in ("tile", "decode"):
        raise ValueError(f"path must be 'tile' or 'decode', got {path!r}")
    if save and path != "tile":
        raise ValueError("the decode path does not save the backward's tensors; use path='tile'")
    # the last step writes the outputs in their dtype, so the fp32 state keeps x_{T-1}, v_{T-1};
    # with early exit, rows that stopped before it are copied afterwards (`_copy_stopped`)
    final_out = cast_out

    x_out = torch.empty_like(x)
    v_out = torch.empty_like(x)
    xs, vs = (torch.empty(n, d, device=dev, dtype=acc), torch.empty(n, d, device=dev, dtype=acc)) \
        if cast_out else (x_out, v_out)
    energy = torch.empty(n, T, device=dev, dtype=acc)
    distance = torch.empty(n, T, device=dev, dtype=acc)
    iterations = torch.full((n,), T, device=dev, dtype=torch.int32)
    c_save = torch.empty(T, n, H, device=dev, dtype=acc) if save else energy
    r_save = torch.empty(T, n, device=dev, dtype=acc) if save else energy
    save_dot = save and DOT != ACC  # c also in the dtype the backward's dots take
    c_dot = torch.empty(T, n, H, device=dev, dtype=out_dtype) if save_dot else c_save
    traj_x = torch.empty(n, T + 1, d, device=dev, dtype=out_dtype) if trajectory else x_out
    traj_v = torch.empty(n, T + 1, d, device=dev, dtype=out_dtype) if trajectory else x_out
    v_in = v if v is not None else x
    exc = table if table is not None else bias
    scalars = dict(zero=0.0, dt=float(dt), kappa=float(kappa) if kappa is not None else 0.0,
                   tol=float(tol) if tol is not None else 0.0, min_iterations=int(min_iterations))
    types = dict(DOT=DOT, PREC=PREC, ACC=ACC)
    flags = dict(HAS_V=v is not None, HAS_EXC=table is not None, USE_KAPPA=kappa is not None,
                 EARLY_EXIT=early_exit, TRAJ=trajectory, FINAL_OUT=final_out, **types)

    config = {k: val for k, val in (config or {}).items()
              if k in ("BM", "BD", "NB", "num_warps", "num_stages", "maxnreg")}
    cfg = dict(_tile_config(d, H, dtype=out_dtype) if path == "tile" else _decode_config(d, H, dtype=out_dtype),
               **config)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}
    if "maxnreg" in launch and _traced():
        launch.pop("maxnreg")  # see `_traced`
    BM, BD = cfg["BM"], cfg["BD"]
    tiles = triton.cdiv(n, BM)
    if path == "tile":
        cfg.pop("NB", None)
    if path == "tile":
        ctx = torch.empty(n, H, device=dev, dtype=acc)
        pre = torch.empty(n, H, device=dev, dtype=acc)
        sq = torch.empty(n, device=dev, dtype=acc)
        even = n % BM == 0 and d % BD == 0  # no masks
        wrap_triton(_fwd_prologue)[(tiles, 1)](
            h, x, v_in, w_h, w_x, w_v, bias, mu, ctx, pre, sq, traj_x, traj_v, n, d, T, triton.cdiv(d, BD), 0.0,
            H=H, BM=BM, BD=BD, HAS_V=v is not None, TRAJ=trajectory, SINGLE=True, EVEN=even, **types, **launch)
        # early exit: the step's tiles are formed from the rows still running (list[:count])
        row_list = torch.arange(n, device=dev, dtype=torch.int32) if early_exit else iterations
        count = torch.full((1,), n, device=dev, dtype=torch.int32) if early_exit else iterations
        running = torch.ones(n, device=dev, dtype=torch.int32) if early_exit else iterations
        for t in range(T):
            wrap_triton(_tile_step)[(tiles,)](
                x, v_in, xs, vs, x_out, v_out, w_x, w_v, w_o, b_o, mod, mu, exc, ctx, pre, sq, row_list, count,
                running, energy, distance, iterations, c_save, c_dot, r_save, traj_x, traj_v, t, n, d, T, **scalars,
                H=H, BM=BM, BD=BD, SAVE=save, SAVE_DOT=save_dot, EVEN=even, I32=n * d < 2**31, **flags, **launch)
            if early_exit and t + 1 < T:
                wrap_triton(_compact_rows)[(1,)](running, row_list, count, n, CHUNK=1024)
    else:
        nblk = triton.cdiv(d, BD)
        NB = cfg.get("NB", 1)
        grid = (tiles, triton.cdiv(nblk, NB))
        ctx_part = torch.empty(nblk, n, H, device=dev, dtype=acc)
        pre_part = torch.empty(nblk, n, H, device=dev, dtype=acc)
        stat_part = torch.empty(4, nblk, n, device=dev, dtype=acc)
        ctx = torch.empty(n, H, device=dev, dtype=acc)
        c = torch.empty(n, H, device=dev, dtype=acc)
        scale = torch.empty(n, device=dev, dtype=acc)
        even = n % BM == 0 and d % (BD * NB) == 0  # no masks: every program's blocks lie inside d
        wrap_triton(_fwd_prologue)[grid](
            h, x, v_in, w_h, w_x, w_v, bias, mu, ctx_part, pre_part, stat_part, traj_x, traj_v, n, d, T, NB, 0.0,
            H=H, BM=BM, BD=BD, HAS_V=v is not None, TRAJ=trajectory, SINGLE=False, EVEN=even, **types, **launch)
        # the reduce: one thread per (row, hidden unit) and 16 loads in flight on a GPU; any HC
        # and BATCH add the shares in the same order
        HC, batch = (H, 1) if interpreting() else (2, 16)
        reduce = dict(H=H, BM=BM, HC=HC, BATCH=batch, USE_KAPPA=kappa is not None, EARLY_EXIT=early_exit, ACC=ACC)
        step_flags = {k: flags[k] for k in ("HAS_V", "HAS_EXC", "EARLY_EXIT", "TRAJ", "FINAL_OUT")}
        for t in range(T + 1):
            wrap_triton(_decode_reduce)[(tiles, H // HC)](
                ctx_part, pre_part, stat_part, bias, ctx, c, scale, energy, distance, iterations, t, n, d, T, nblk,
                scalars["kappa"], scalars["tol"], scalars["min_iterations"], **reduce)
            if t < T:
                wrap_triton(_decode_step)[grid](
                    x, v_in, xs, vs, x_out, v_out, w_x, w_v, w_o, b_o, mod, mu, exc, c, scale, pre_part, stat_part,
                    iterations, traj_x, traj_v, t, n, d, T, NB, nblk, 0.0, scalars["dt"], H=H, BM=BM, BD=BD,
                    EVEN=even, **step_flags, **types, **launch)

    if early_exit and cast_out:
        wrap_triton(_copy_stopped)[(triton.cdiv(n, 16),)](xs, vs, x_out, v_out, iterations, n, d, T, BM=16,
                                                         BD=128)
    if early_exit:
        # rows that stopped early left the later statistics (and trajectory) unwritten:
        # a frozen row repeats its state from its last step on
        steps = torch.arange(T, device=dev)
        last = torch.minimum(steps[None, :], iterations[:, None].long() - 1)
        energy = energy.gather(1, last)
        distance = distance.gather(1, last)
        if trajectory:
            states = torch.minimum(torch.arange(T + 1, device=dev)[None, :], iterations[:, None].long())
            index = states[:, :, None].expand(n, T + 1, d)
            traj_x, traj_v = traj_x.gather(1, index), traj_v.gather(1, index)
    trajectories = (traj_x, traj_v) if trajectory else (None, None)
    saved = (c_save, c_dot, r_save) if save else (None, None, None)
    return x_out, v_out, energy, distance, iterations, trajectories, (xs, vs), saved


def _backward_config(n, d, H, device, config, gpu=None, dtype=torch.bfloat16):
    """Block sizes of the two backward kernels, a fixed function of the shape, and the row
    splits of phase 2. Phase 1 (`_bwd_rows`): BM rows × BD columns, num_warps; phase 2
    (`_bwd_cols`): BM2 × BD2, num_warps2 (the phase-1 values when a config omits them).
    Chosen from the static sm_90 compile (benchmarks/kernel_report.py): phase 1 at 128 rows
    over 8 warps (two warp groups of 64 rows: no tile is replicated across warps) and 16
    columns; phase 2 at 64 rows, 16 columns (8 at H = 128) and 8 warps, where Triton splits the
    columns over the two warp groups. bf16/fp16 at H = 128 (with DEFER and REREAD): phase 1 at
    64 rows and 32 columns (no spills, and 16 % fewer bytes a row and step than 16 columns,
    which spill 88 B; 744 B at 128 rows, 644 at 64 columns), phase 2 at 32 rows over 4 warps (no
    spills; 64 B at 64 rows, 200 at 16 columns). fp32 at H = 64: phase 1 at 8 columns (a tf32
    dot's K; 560 B of spills instead of 952 at 16, the pair of phases still under the previous
    design's bytes: 662 against 682 KB a row and step at d = 2048; at H = 32 8 columns spill
    80 B but move more bytes than the previous design, at H = 128 they need 288 KB of shared
    memory, more than a multiprocessor has, or with REREAD spill 2104 B). SPLITS: phase 2 runs
    about 4 programs per multiprocessor."""
    if config is not None:
        cfg = dict(config)
    elif not (gpu if gpu is not None else not interpreting()):
        cfg = dict(BM=16, BD=32)
    else:
        narrow = H > 64 and dtype != torch.float32
        # one stage, as the static report compiles them: Triton's default (3) pipelines the
        # loads that feed the dots through shared memory, which spills at H = 64 (bf16 92 and
        # 28 B a thread) and raises the shared memory 1.5-2.7x
        columns = 32 if narrow else 8 if dtype == torch.float32 and H == 64 else 16  # phase 1's BD
        cfg = dict(BM=64 if narrow else 128, BD=columns, num_warps=8, num_stages=1, BM2=32 if narrow else 64,
                   BD2=16 if H <= 64 else 8, num_warps2=4 if narrow else 8, num_stages2=1)
    for key in ("BM", "BD", "num_warps", "num_stages"):
        if key in cfg:
            cfg.setdefault(key + "2", cfg[key])
    # the register-layout switches (a config may set any of them): DEFER, DC and REREAD of
    # `_bwd_rows`, RELOAD_W of `_bwd_cols`
    BD = cfg["BD"]
    cfg["DC"] = max(BD, min(cfg.get("DC", 128), triton.next_power_of_2(d)) // BD * BD)
    cfg.setdefault("DEFER", _defer_bwd_rows(H, dtype))
    cfg.setdefault("REREAD", H > 64)
    cfg.setdefault("RELOAD_W", _reload_bwd_weights(H, dtype))
    if "SPLITS" not in cfg:
        tiles = triton.cdiv(n, cfg["BM2"])
        sms = multiprocessors(device) if device.type == "cuda" else 1
        programs = 4 * sms
        cfg["SPLITS"] = max(1, min(tiles, programs // triton.cdiv(d, cfg["BD2"])))
    return cfg


_DOT_TORCH = {tl.float64: torch.float64, tl.float32: torch.float32, tl.float16: torch.float16,
              tl.bfloat16: torch.bfloat16}


def _defer_bwd_rows(H, dtype):
    """Whether `_bwd_rows` parks the dL/dz blocks and runs the dL/dc dots once per DC columns
    (DEFER) instead of carrying the [BM, H] accumulator through the pass: at H = 128, and in
    fp32 (tf32x3 operands) at H = 64 too. Static sm_90 report, spill bytes a thread: bf16/fp16
    H = 128 388 -> 88 (with REREAD, 64-row blocks; 0 at 32 columns); fp32 H = 64/128 1528/3308 -> 952/2432, and
    at H = 128 the 320 KB of shared memory that could not launch -> 128 KB. Not at fp32 H = 32
    (516 -> 288 B, but parking the blocks would move more bytes per row and step than the
    previous design), nor bf16/fp16 at H <= 64 (no spills)."""
    return H > 64 or (dtype == torch.float32 and H > 32)


def _reload_bwd_weights(H, dtype):
    """Whether `_bwd_cols` reads its six [H, BD] weight tiles where each dot takes them rather
    than once per program (every warp holds the whole B operand of a dot: held through the
    program they take ~100 registers at H = 128). Static sm_90 report, spill bytes a thread held
    -> re-read: bf16/fp16 H = 128 308 -> 64 (0 with 32-row blocks); fp32 (tf32x3 operands) H = 32/64/128 864/2728/2704
    -> 136/556/600; bf16/fp16 at H <= 64 do not spill and keep them held. The re-reads hit L1
    (the program's own tiles, 12-24 KB); the report counts them as L2 bytes all the same."""
    return H > 64 or dtype == torch.float32


def _launch_options(cfg):
    """The launch options of phase 1 and phase 2 (num_warps, num_stages) in a `_backward_config`
    result; Triton's defaults where it has none (the test configurations)."""
    return ({k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg},
            {k: cfg[k + "2"] for k in ("num_warps", "num_stages") if k + "2" in cfg})


def _halves(buffer, dtype, n, d):
    """Two [n, d] tensors of a 2-byte dtype in the storage of one fp32 [n, d] buffer."""
    flat = buffer.view(dtype).view(-1)
    return flat[: n * d].view(n, d), flat[n * d:].view(n, d)


def _backward(saved, grads, dt, kappa, T, config, needs_phase2):
    """Launches the two backward kernels; returns the gradients of (h, x, v, w_h, w_x, w_v, w_o,
    b_o, bias, mod, mu, table), before the casts to the inputs' dtypes.

    Memory: for bf16/fp16 inputs phase 1 carries its fp32 gradients in the forward's fp32
    state buffers (xs, vs), which the backward owns; once phase 1 is done their storage holds
    dL/dh and dL/dx (and dL/dv) in the input dtype. For fp32 inputs the carry is dL/dx itself
    (phase 2 writes it only after phase 1 is done and never reads it) and one fp32 [N, d]."""
    h, x, v, w_h, w_x, w_v, w_o, b_o, mod, mu, table, c_save, c_dot, r_save, xs, vs = saved
    gx_T, gv_T, g_energy, g_distance = (None if g is None else g.contiguous() for g in grads)
    n, d = x.shape
    H = w_h.shape[0]
    dev, acc = x.device, c_save.dtype
    DOT, PREC, ACC = _dot_types(x.dtype)
    cfg = _backward_config(n, d, H, dev, config, dtype=x.dtype)
    splits = cfg["SPLITS"]
    launch, launch2 = _launch_options(cfg)
    BM, BD, BM2, BD2 = cfg["BM"], cfg["BD"], cfg["BM2"], cfg["BD2"]
    cast = x.dtype != acc
    last_saved = cast and T >= 2  # the forward's last step left x_{T-1}, v_{T-1} in (xs, vs)
    if cast:
        gx_s, gv_s = xs, vs
    else:
        dx = torch.empty_like(x)
        dv = torch.empty_like(x) if v is not None else None
        gx_s = dx
        gv_s = dv if dv is not None else torch.empty(n, d, device=dev, dtype=acc)
    gpre = torch.empty(T, n, H, device=dev, dtype=acc)
    save_dot = c_dot.dtype != acc  # phase 2 reads c and gpre in the dots' dtype
    gpre_dot = torch.empty(T, n, H, device=dev, dtype=x.dtype) if save_dot else gpre
    rc = torch.empty(T, n, device=dev, dtype=acc)
    v_in = v if v is not None else x
    exc = table if table is not None else mod
    dummy = c_save
    flags = dict(HAS_V=v is not None, HAS_EXC=table is not None, USE_KAPPA=kappa is not None,
                 HAS_GX=gx_T is not None, HAS_GV=gv_T is not None, HAS_GE=g_energy is not None,
                 HAS_GD=g_distance is not None, DOT=DOT, PREC=PREC, ACC=ACC)
    upstream = tuple(dummy if g is None else g for g in (gx_T, gv_T, g_energy, g_distance))
    kappa_f = float(kappa) if kappa is not None else 0.0
    defer, dc = cfg["DEFER"], cfg["DC"]
    if defer:  # each program's parked dL/dz blocks and dL/dc accumulator (see `_bwd_rows`)
        programs = triton.cdiv(n, BM)
        zs = torch.empty(programs * 4 * BM * dc, device=dev, dtype=_DOT_TORCH[DOT])
        gcs = torch.empty(programs * BM * H, device=dev, dtype=acc)
    else:
        zs = gcs = dummy
    wrap_triton(_bwd_rows)[(triton.cdiv(n, BM),)](
        x, v_in, xs if xs is not None else gx_s, vs if vs is not None else gv_s, gx_s, gv_s, w_x, w_v, w_o, b_o,
        mod, mu, exc, c_save, c_dot, r_save, *upstream, gpre, gpre_dot, rc, zs, gcs, n, d, T, float(dt), kappa_f, H=H,
        BM=BM, BD=BD, LAST_SAVED=last_saved, SAVE_DOT=save_dot, EVEN=n % BM == 0 and d % BD == 0, DEFER=defer,
        DC=dc, REREAD=cfg["REREAD"], **flags, **launch)

    if cast:  # the carry is dead: its storage takes the input-dtype gradients
        dh, dx = _halves(xs, x.dtype, n, d)
        dv = _halves(vs, x.dtype, n, d)[0] if v is not None else None
    gpre_sum = gpre.sum(0)
    mm_dtype = h.dtype if h.dtype in (torch.float16, torch.bfloat16) else acc
    if cast and h.dtype == x.dtype:
        torch.mm(gpre_sum.to(mm_dtype), w_h.to(mm_dtype), out=dh)
    else:
        dh = gpre_sum.to(mm_dtype) @ w_h.to(mm_dtype)
    dw_h = gpre_sum.t().to(mm_dtype) @ h.to(mm_dtype)
    dbias = gpre_sum.sum(0)
    if not needs_phase2:
        return dh, None, None, dw_h, None, None, None, None, dbias, None, None, None

    nj = triton.cdiv(d, BD2)
    # the weight-gradient partials: every tile adds to its program's slots
    pwo = torch.zeros(splits, 4 * d, H, device=dev, dtype=acc)
    dwx = torch.zeros(splits, H, d, device=dev, dtype=acc)
    dwv = torch.zeros(splits, H, d, device=dev, dtype=acc)
    dz = torch.empty(splits, 4 * d, device=dev, dtype=acc)
    dmu = torch.empty(splits, d, device=dev, dtype=acc)
    dtab = torch.empty(splits, T, d, device=dev, dtype=acc)
    # each program's replayed x_t, v_t (t = 1 .. T-1) of its current tile
    replay = torch.empty(max(1, nj * splits * 2 * (T - 1) * BM2 * BD2), device=dev, dtype=acc)
    # and the four dL/dz_q tiles of every step, in the dots' dtype
    gq = torch.empty(nj * splits * 4 * T * BM2 * BD2, device=dev, dtype=c_dot.dtype)
    wrap_triton(_bwd_cols)[(nj, splits)](
        x, v_in, w_x, w_v, w_o, b_o, mod, mu, exc, c_dot, r_save, *upstream, gpre_dot, rc,
        dx, dv if dv is not None else dx, replay, gq, pwo, dz, dwx, dwv, dmu, dtab,
        n, d, T, float(dt), kappa_f, splits, H=H, BM=BM2, BD=BD2, TP=triton.next_power_of_2(T),
        EVEN=n % BM2 == 0 and d % BD2 == 0, RELOAD_W=cfg["RELOAD_W"], **flags, **launch2)
    # the splits' partials, summed in a fixed order: the same bits on every run
    pwo, dz = pwo.sum(0).view(4, d, H), dz.sum(0).view(4, d)
    ms = mod[:4]
    dwo = (ms[:, None, None] * pwo).view(4 * d, H)
    dbo = (ms[:, None] * dz).view(4 * d)
    # z_q = ms_q·q + mb_q and q = c·w_oᵀ + b_o: Σ g_zq·q = <w_o_q, P_q> + <b_o_q, dz_q>
    dms = (w_o.to(acc).view(4, d, H) * pwo).sum((1, 2)) + (b_o.to(acc).view(4, d) * dz).sum(1)
    dmod = torch.cat((dms, dz.sum(1)))
    return (dh, dx, dv, dw_h, dwx.sum(0), dwv.sum(0), dwo, dbo, dbias, dmod,
            dmu.sum(0), dtab.sum(0) if table is not None else None)


def _none_if_empty(t):
    """An op returns a tensor for every output: an empty one stands for "none"."""
    return None if t is None or t.numel() == 0 else t


@torch.library.triton_op("inl::triton_iterate_train", mutates_args=())
def triton_iterate_train_op(h: Tensor, x: Tensor, v: Optional[Tensor], w_h: Tensor, w_x: Tensor, w_v: Tensor,
                            w_o: Tensor, b_o: Tensor, bias: Tensor, mod: Tensor, mu: Tensor, table: Optional[Tensor],
                            dt: float, kappa: Optional[float], num_iterations: int, config: str
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training forward (every step runs, tile path): (x_T, v_T, energy, distance, iterations)
    and what the backward reads: per step the controller hidden c [T, N, H] (fp32), c in the
    dots' dtype (empty when that is fp32), rms [T, N], and for bf16/fp16 inputs the fp32 state
    pair, which holds x_{T-1}, v_{T-1} (empty for fp32 inputs: the outputs are the state)."""
    x_out, v_out, energy, distance, iterations, _, (xs, vs), (c_save, c_dot, r_save) = _forward(
        h, x, v, w_h, w_x, w_v, w_o, b_o, bias, mod, mu, table, dt, kappa, num_iterations, None, 0, save=True,
        path="tile", config=_config_dict(config))
    cast = x.dtype != compute_dtype(x.dtype)
    empty = x.new_empty(0, dtype=c_save.dtype)  # distinct outputs: an op's outputs never alias
    return (x_out, v_out, energy, distance, iterations, c_save, c_dot if c_dot.dtype != c_save.dtype else empty.clone(),
            r_save, xs if cast else empty.clone(), vs if cast else empty.clone())


@torch.library.triton_op("inl::triton_iterate_backward", mutates_args=("xs", "vs"))
def triton_iterate_backward_op(h: Tensor, x: Tensor, v: Optional[Tensor], w_h: Tensor, w_x: Tensor, w_v: Tensor,
                               w_o: Tensor, b_o: Tensor, mod: Tensor, mu: Tensor, table: Optional[Tensor],
                               c_save: Tensor, c_dot: Tensor, r_save: Tensor, xs: Tensor, vs: Tensor,
                               gx_T: Optional[Tensor], gv_T: Optional[Tensor], g_energy: Optional[Tensor],
                               g_distance: Optional[Tensor], dt: float, kappa: Optional[float], num_iterations: int,
                               config: str, needs_phase2: bool
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                          Tensor, Tensor, Tensor]:
    """The gradients of (h, x, v, w_h, w_x, w_v, w_o, b_o, bias, mod, mu, table) in the compute
    dtype, an empty tensor for each one not computed. For bf16/fp16 inputs the backward's fp32
    carry is the forward's state pair (xs, vs), which this op overwrites: afterwards their
    storage holds dL/dh and dL/dx (xs) and dL/dv (vs) in the input dtype, which the autograd
    formula views (`_state_gradients` names them); those come back empty here (an op's output
    never aliases an input). So a second backward through the same graph raises (the saved state was modified)
    rather than reading gradients as states."""
    saved = (h, x, v, w_h, w_x, w_v, w_o, b_o, mod, mu, table, c_save,
             c_dot if c_dot.numel() else c_save, r_save, _none_if_empty(xs), _none_if_empty(vs))
    grads = _backward(saved, (gx_T, gv_T, g_energy, g_distance), dt, kappa, num_iterations, _config_dict(config),
                      needs_phase2)
    in_state = _state_gradients(h, x, v) if xs.numel() else ()
    empty = x.new_empty(0)
    return tuple(empty.clone() if (g is None or name in in_state) else g for name, g in zip(_GRAD_INPUTS, grads))


def _state_gradients(h, x, v):
    """The gradients the backward leaves in the storage of the state pair (bf16/fp16 inputs)."""
    return ("x",) + (("h",) if h.dtype == x.dtype else ()) + (("v",) if v is not None else ())


def _setup_context(ctx, inputs, output):
    h, x, v, w_h, w_x, w_v, w_o, b_o, bias, mod, mu, table, dt, kappa, T, config = inputs
    c_save, c_dot, r_save, xs, vs = output[5:]
    ctx.save_for_backward(h, x, v, w_h, w_x, w_v, w_o, b_o, mod, mu, table, c_save, c_dot, r_save, xs, vs)
    ctx.constants = (dt, kappa, T, config)
    ctx.mark_non_differentiable(*output[4:])
    ctx.set_materialize_grads(False)


def _backward_formula(ctx, gx_T, gv_T, g_energy, g_distance, *_):
    dt, kappa, T, config = ctx.constants
    h, x, v, w_h, w_x, w_v, w_o, b_o, mod, mu, table, c_save, c_dot, r_save, xs, vs = ctx.saved_tensors
    need = dict(zip(_GRAD_INPUTS, ctx.needs_input_grad))
    # phase 1 alone gives dh, dw_h and d bias; every other input's gradient needs phase 2
    phase2 = any(need[k] for k in _GRAD_INPUTS if k not in ("h", "w_h", "bias"))
    if not xs.numel():  # fp32/fp64: no state pair to overwrite; the saved empties stay unmodified,
        xs, vs = xs.new_empty(0), vs.new_empty(0)  # so backward may run twice (retain_graph)
    grads = dict(zip(_GRAD_INPUTS, triton_iterate_backward_op(
        h, x, v, w_h, w_x, w_v, w_o, b_o, mod, mu, table, c_save, c_dot, r_save, xs, vs, gx_T, gv_T, g_energy,
        g_distance, dt, kappa, T, config, phase2)))
    if xs.numel():  # dL/dh, dL/dx (and dL/dv) in the state pair's storage
        n, d = x.shape
        in_state = _state_gradients(h, x, v)
        first, second = _halves(xs, x.dtype, n, d)
        grads["x"] = second
        if "h" in in_state:
            grads["h"] = first
        if v is not None:
            grads["v"] = _halves(vs, x.dtype, n, d)[0]
    like = dict(h=h, x=x, v=v, w_h=w_h, w_x=w_x, w_v=w_v, w_o=w_o, b_o=b_o, bias=None, mod=mod, mu=mu, table=table)
    # bias is built in the compute dtype; every other gradient takes its input's dtype
    out = [None if not need[k] or grads[k].numel() == 0 else grads[k] if like[k] is None
           else grads[k].to(like[k].dtype) for k in _GRAD_INPUTS]
    return (*_once_differentiable(out), None, None, None, None)


def _once_differentiable(grads):
    """Under create_graph=True the gradients come back requiring grad through a node that raises
    if anything differentiates them (as torch.autograd.function.once_differentiable does): the
    backward has no derivative of its own, and dh/dx/dv are views of the state pair's storage,
    which autograd would otherwise treat as constants — a gradient penalty through the iterate
    would silently contribute nothing."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    live = [i for i, g in enumerate(grads) if g is not None]
    if not live:
        return grads
    err = torch._C._functions.DelayedError(b"the Triton iterate's backward is not differentiable (no double "
                                           b"backward): use backend='reference' for higher-order gradients",
                                           len(live))
    wrapped = err(*[grads[i].detach().requires_grad_(True) for i in live])
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    out = list(grads)
    for i, g in zip(live, wrapped):
        out[i] = g
    return out


triton_iterate_train_op.register_autograd(_backward_formula, setup_context=_setup_context)

# the differentiable tensor inputs of the training op, in order: what _backward returns gradients of
_GRAD_INPUTS = ("h", "x", "v", "w_h", "w_x", "w_v", "w_o", "b_o", "bias", "mod", "mu", "table")


# ----------------------------------------------------------------------------------------------
# the backend entry points


def supports(h, x, v, params: IterateParams, settings: IterateSettings):
    """None when the triton kernels run these arguments, else why not."""
    H = params.hidden
    if H not in SUPPORTED_HIDDEN:
        return f"controller hidden size H={H} is not one of {SUPPORTED_HIDDEN} (tl.dot tiles)"
    if x.dtype == torch.float64 and not interpreting():
        return "float64 runs only under the Triton interpreter (TRITON_INTERPRET=1)"
    if settings.return_trajectory and needs_grad(h, x, v, params):
        return "the triton iterate does not differentiate a returned trajectory (it runs on the reference)"
    return None


def _config_text(config) -> str:
    """A block-size override (tests, benchmarks) as the op's string argument: "BM=16,BD=32"."""
    return ",".join(f"{k}={int(v)}" for k, v in sorted((config or {}).items()))


def _config_dict(text: str):
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)} or None


@torch.library.triton_op("inl::triton_iterate", mutates_args=())
def triton_iterate_op(h: Tensor, x: Tensor, v: Optional[Tensor], w_h: Tensor, w_x: Tensor, w_v: Tensor, w_o: Tensor,
                      b_o: Tensor, bias: Tensor, mod: Tensor, mu: Tensor, table: Optional[Tensor], dt: float,
                      kappa: Optional[float], num_iterations: int, tol: Optional[float], min_iterations: int,
                      trajectory: bool, path: str, config: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                         Tensor, Tensor]:
    """The inference forward: (x_T, v_T, energy, distance, iterations, trajectory_x, trajectory_v),
    the trajectories empty unless asked for. `path` ("", "tile", "decode") and `config` (block
    sizes as "BM=..,BD=..") override the dispatch's choice (tests, benchmarks)."""
    x_out, v_out, energy, distance, iterations, (traj_x, traj_v), _, _ = _forward(
        h, x, v, w_h, w_x, w_v, w_o, b_o, bias, mod, mu, table, dt, kappa, num_iterations, tol, min_iterations,
        trajectory=trajectory, path=path or None, config=_config_dict(config))
    if not trajectory:  # an op returns tensors of its own: distinct empty ones for the trajectories
        traj_x, traj_v = x.new_empty(0), x.new_empty(0)
    return x_out, v_out, energy, distance, iterations, traj_x, traj_v


def iterate(h, x, v, params: IterateParams, settings: IterateSettings, _path=None, _config=None):
    """SPEC §2 through the Triton kernels; returns (x_T, IterateInfo) like the reference.
    Inference runs the registered op `inl::triton_iterate`, training `inl::triton_iterate_train`
    with `inl::triton_iterate_backward` as its autograd formula (torch.compile traces into the
    kernels of all three). `_path` ("tile" | "decode", inference only) and `_config` (block
    sizes, and SPLITS for the backward) are for tests and benchmarks."""
    p, s = params, settings
    T = s.num_iterations
    acc = compute_dtype(x.dtype)
    if needs_grad(h, x, v, params):  # every step runs (tol is ignored) on the tile path
        table, bias, mod = fold_parameters(params, s, x.shape[1], acc)
        x_out, v_out, energy, distance, iterations = triton_iterate_train_op(
            h, x, v, p.w_h, p.w_x, p.w_v, p.w_o, p.b_o, bias, mod, p.mu, table, s.dt, s.kappa, T,
            _config_text(_config))[:5]
        return x_out, IterateInfo(v=v_out, iterations=iterations, energy=energy, distance=distance)
    with torch.no_grad():
        table, bias, mod = fold_parameters(params, s, x.shape[1], acc)
        x_out, v_out, energy, distance, iterations, traj_x, traj_v = triton_iterate_op(
            h, x, v, p.w_h, p.w_x, p.w_v, p.w_o, p.b_o, bias, mod, p.mu, table, s.dt, s.kappa, T, s.tol,
            s.min_iterations, s.return_trajectory, _path or "", _config_text(_config))
    trajectory = s.return_trajectory
    return x_out, IterateInfo(v=v_out, iterations=iterations, energy=energy, distance=distance,
                              trajectory_x=traj_x if trajectory else None, trajectory_v=traj_v if trajectory else None)
