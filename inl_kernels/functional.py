"""The public functional ops. Each validates its arguments (metadata only), picks a backend
through `_dispatch.resolve`, and calls it. Math: SPEC §2–3 and each reference module."""
from __future__ import annotations


from . import _validate as check
from ._dispatch import resolve
from .reference.iterate import IterateInfo


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
    tol: early exit per row once ‖x' − x‖₂ < tol after at least `min_iterations` steps; ignored
    when a gradient is needed.

    Returns x_T, or (x_T, IterateInfo) when return_info or return_trajectory is set.
    """
    check.iterate_args(h, x, w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o, mod_scale, mod_bias, mu,
                       exc_index, gamma, phi, amplitude, dt, kappa, num_iterations, v, tol,
                       min_iterations, return_info, return_trajectory)
    args = (h, x)
    kwargs = dict(w_h=w_h, b_h=b_h, w_x=w_x, b_x=b_x, w_v=w_v, b_v=b_v, w_o=w_o, b_o=b_o,
                  mod_scale=mod_scale, mod_bias=mod_bias, mu=mu, exc_index=exc_index, gamma=gamma,
                  phi=phi, amplitude=float(amplitude), dt=float(dt),
                  kappa=None if kappa is None else float(kappa), num_iterations=int(num_iterations),
                  v=v, tol=None if tol is None else float(tol), min_iterations=int(min_iterations),
                  return_trajectory=return_trajectory)
    if h.shape[0] == 0:
        backend = "reference"  # an empty batch launches nothing anywhere
    fn = resolve("iterate", backend, h.device.type, *args, **kwargs)
    x_out, info = fn(*args, **kwargs)
    return (x_out, info) if (return_info or return_trajectory) else x_out


def rms_norm(x, weight, eps=1e-6, residual=None, backend="auto"):
    """x · rsqrt(mean(x²) + eps) · weight over the last dim, statistics in fp32.
    With `residual`, returns (rms_norm(x + residual), x + residual)."""
    check.rms_norm_args(x, weight, eps, residual)
    fn = resolve("rms_norm", backend, x.device.type, x, weight, float(eps), residual)
    return fn(x, weight, float(eps), residual)


def rope(q, k, cos, sin, position_offset=0, backend="auto"):
    """Rotates q [B, Hq, S, D] and k [B, Hkv, S, D] (rotate-half) at positions
    position_offset … position_offset+S-1; cos, sin are [S_max, D/2]. Returns (q, k)."""
    check.rope_args(q, k, cos, sin, position_offset)
    fn = resolve("rope", backend, q.device.type, q, k, cos, sin, int(position_offset))
    return fn(q, k, cos, sin, int(position_offset))


def gqa_attention(q, k, v, causal=True, scale=None, rope=None, backend="auto"):
    """Grouped-query attention: q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], Hq % Hkv == 0. Queries
    sit at the end of the keys (Sq < Skv is KV-cache decode). rope=(cos, sin) rotates q and k
    inside the op at their positions. Returns [B, Hq, Sq, D]."""
    check.attention_args(q, k, v, causal, scale, rope)
    scale = None if scale is None else float(scale)
    rope = None if rope is None else tuple(rope)
    fn = resolve("attention", backend, q.device.type, q, k, v, causal, scale, rope)
    return fn(q, k, v, causal, scale, rope)


def swiglu(x, w_gate, w_up, w_down, backend="auto"):
    """(silu(x·w_gateᵀ) · (x·w_upᵀ))·w_downᵀ with w_gate, w_up [F, d] and w_down [d, F];
    weights in x's dtype or fp32 (under autocast or with fp32 master weights)."""
    check.tensor("x", x, contiguous=False)
    d = x.shape[-1]
    check.tensor("w_gate", w_gate, shape=(None, d), device=x.device, contiguous=False)
    f = w_gate.shape[0]
    check.tensor("w_up", w_up, shape=(f, d), device=x.device, contiguous=False)
    check.tensor("w_down", w_down, shape=(d, f), device=x.device, contiguous=False)
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check.param_dtype(name, w, x.dtype)
    return resolve("swiglu", backend, x.device.type, x, w_gate, w_up, w_down)(x, w_gate, w_up, w_down)


def low_rank_embedding(ids, embed_low, project_up, backend="auto"):
    """embed_low[ids] · project_upᵀ with embed_low [V, r] and project_up [d, r]; the result is
    in project_up's dtype (or the autocast dtype)."""
    check.tensor("ids", ids, dtypes=check.INDEX_DTYPES, contiguous=False)
    check.tensor("embed_low", embed_low, shape=(None, None), device=ids.device, contiguous=False)
    r = embed_low.shape[1]
    check.tensor("project_up", project_up, shape=(None, r), device=ids.device, contiguous=False)
    check.param_dtype("embed_low", embed_low, project_up.dtype)
    check.token_ids("ids", ids, embed_low.shape[0])
    fn = resolve("embedding", backend, ids.device.type, ids, embed_low, project_up)
    return fn(ids, embed_low, project_up)


__all__ = ["inl_iterate", "IterateInfo", "rms_norm", "rope", "gqa_attention", "swiglu",
           "low_rank_embedding"]
