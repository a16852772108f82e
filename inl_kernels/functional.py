"""The public functional ops. Each validates its arguments (metadata only), picks a backend
through `_dispatch.resolve`, and calls it inside a profiler range named after the op
(`inl::iterate`, ...), so the op shows in a trace whatever backend runs it. Math: SPEC §2–3 and
each reference module.

Everything on this path is traceable by torch.compile: value checks that read tensor data run
in eager mode only, the backend table is built at import, and every compiled backend's kernels
are registered torch.library ops."""
from __future__ import annotations

import contextlib

import torch

from . import _validate as check
from ._dispatch import resolve
from .common import IterateInfo, IterateParams


def _op_range(name: str):
    """A profiler range for one op call while a profiler records (entering one costs ~10 µs
    even when none does); skipped while torch.compile traces (a compiled graph keeps the
    registered ops' own names)."""
    if torch.compiler.is_compiling() or not torch._C._autograd._profiler_enabled():
        return _NO_RANGE
    return torch.profiler.record_function(name)


_NO_RANGE = contextlib.nullcontext()


def inl_iterate(h, x, *, w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o, mod_scale, mod_bias, mu,
                exc_index, gamma, phi, amplitude, dt, kappa, num_iterations, v=None,
                tol=None, min_iterations=3, backend="auto", return_info=False,
                return_trajectory=False):
    """Runs `num_iterations` steps of the integrator dynamics on every row of x (SPEC §2).

    h, x, v: [N, d] context, initial state and optional initial velocity (zeros when None).
    w_h/w_x/w_v [H, d], b_* [H], w_o [4d, H], b_o [4d]: the controller (nn.Linear layout).
    mod_scale, mod_bias [4]: per-layer modulation of (alpha, beta, gate, v_cand).
    mu [d]: the equilibrium. exc_index [E] (sorted, unique), gamma, phi [E]: sparse excitation
    amplitude·sin(gamma·t + phi) on those dims. kappa=None switches dynamic alpha off.
    num_iterations: 1 .. common.MAX_ITERATIONS steps.
    tol: early exit per row once ‖x' − x‖₂ < tol after at least `min_iterations` steps; ignored
    when a gradient is needed.

    Returns x_T, or (x_T, IterateInfo) when return_info or return_trajectory is set.
    """
    params = IterateParams(w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o, mod_scale, mod_bias, mu, exc_index, gamma, phi)
    settings = check.iterate_args(h, x, v, params, amplitude, dt, kappa, num_iterations, tol, min_iterations,
                                  return_info, return_trajectory)
    with _op_range("inl::iterate"):
        # an empty batch launches nothing anywhere: the reference returns its empty results
        fn = resolve("iterate", "reference" if h.shape[0] == 0 else backend, h.device.type, h, x, v, params,
                     settings)
        x_out, info = fn(h, x, v, params, settings)
    return (x_out, info) if (return_info or return_trajectory) else x_out


def rms_norm(x, weight, eps=1e-6, residual=None, backend="auto"):
    """x · rsqrt(mean(x²) + eps) · weight over the last dim, statistics in fp32.
    With `residual`, returns (rms_norm(x + residual), x + residual)."""
    check.rms_norm_args(x, weight, eps, residual)
    with _op_range("inl::rms_norm"):
        fn = resolve("rms_norm", backend, x.device.type, x, weight, float(eps), residual)
        return fn(x, weight, float(eps), residual)


def rope(q, k, cos, sin, position_offset=0, backend="auto"):
    """Rotates q [B, Hq, S, D] and k [B, Hkv, S, D] (rotate-half) at positions
    position_offset … position_offset+S-1; cos, sin are [S_max, D/2]. Returns (q, k)."""
    check.rope_args(q, k, cos, sin, position_offset)
    with _op_range("inl::rope"):
        fn = resolve("rope", backend, q.device.type, q, k, cos, sin, int(position_offset))
        return fn(q, k, cos, sin, int(position_offset))


def gqa_attention(q, k, v, causal=True, scale=None, rope=None, backend="auto", kv_lens=None, kv_starts=None):
    """Grouped-query attention: q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], Hq % Hkv == 0. Queries
    sit at the end of the keys (Sq < Skv is KV-cache decode). rope=(cos, sin) rotates q and k
    inside the op at their positions. Returns [B, Hq, Sq, D].

    kv_lens, kv_starts: optional int tensors [B] on q's device. Row b's keys are then
    [kv_starts[b], kv_lens[b]) of k/v: a static KV cache passes its full buffers and the filled
    length as a device tensor (nothing on the host changes per token, so decode can be captured
    in a CUDA graph), a left-padded batch passes each row's padding as kv_starts (positions then
    count from there, and the row computes what it computes alone). Queries end at kv_lens[b];
    a query that sees no key (padding) returns zeros."""
    check.attention_args(q, k, v, causal, scale, rope, kv_lens, kv_starts)
    scale = None if scale is None else float(scale)
    rope = None if rope is None else tuple(rope)
    with _op_range("inl::attention"):
        fn = resolve("attention", backend, q.device.type, q, k, v, causal, scale, rope, kv_lens, kv_starts)
        return fn(q, k, v, causal, scale, rope, kv_lens, kv_starts)


def swiglu(x, w_gate, w_up, w_down, backend="auto"):
    """(silu(x·w_gateᵀ) · (x·w_upᵀ))·w_downᵀ with w_gate, w_up [F, d] and w_down [d, F];
    weights in x's dtype or fp32 (under autocast or with fp32 master weights)."""
    check.swiglu_args(x, w_gate, w_up, w_down)
    with _op_range("inl::swiglu"):
        return resolve("swiglu", backend, x.device.type, x, w_gate, w_up, w_down)(x, w_gate, w_up, w_down)


def linear(x, weight, bias=None, backend="auto"):
    """x·weightᵀ + bias with weight [O, K] and bias [O] or None: F.linear, with few-row inference
    on a CPU (decode) through a matrix-vector kernel that streams the weight at the machine's
    read rate (inl_kernels/cpu/linear.py). Autocast and autograd as for F.linear."""
    check.linear_args(x, weight, bias)
    with _op_range("inl::linear"):
        return resolve("linear", backend, x.device.type, x, weight, bias)(x, weight, bias)


def low_rank_embedding(ids, embed_low, project_up, backend="auto"):
    """embed_low[ids] · project_upᵀ with embed_low [V, r] and project_up [d, r]; the result is
    in project_up's dtype (or the autocast dtype)."""
    check.embedding_args(ids, embed_low, project_up)
    with _op_range("inl::embedding"):
        fn = resolve("embedding", backend, ids.device.type, ids, embed_low, project_up)
        return fn(ids, embed_low, project_up)


__all__ = ["inl_iterate", "IterateInfo", "rms_norm", "rope", "gqa_attention", "swiglu", "linear",
           "low_rank_embedding"]
