"""Eager reference of the integrator iterate (SPEC §2): the oracle every backend is tested against.

For each row, for t = 0 .. T-1:

    c       = relu(h·w_hᵀ + b_h + x·w_xᵀ + b_x + v·w_vᵀ + b_v)
    a,b,g,u = split(c·w_oᵀ + b_o, 4)
    alpha   = sigmoid(ms0·a + mb0) · (1 - exp(-kappa · rms(x - mu)))   (second factor only if kappa)
    beta    = softplus(ms1·b + mb1);  gate = sigmoid(ms2·g + mb2);  v_cand = ms3·u + mb3
    v'      = alpha·v + (1 - alpha)·v_cand - beta·(x - mu) + exc_t
    x'      = x + dt · gate · v'

with exc_t[exc_index[k]] = amplitude · sin(gamma_k·t + phi_k). Computes in fp64 for fp64
inputs and in fp32 otherwise; x_T, v_T and the trajectory come back in x's dtype, the
statistics in the compute dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class IterateInfo(NamedTuple):
    """What `inl_iterate(..., return_info=True)` returns beside x_T."""

    v: torch.Tensor  # [N, d] final velocity, dtype of x
    iterations: torch.Tensor  # [N] int32: steps each row ran (T without early exit)
    energy: torch.Tensor  # [N, T] mean_j v² after each step (compute dtype)
    distance: torch.Tensor  # [N, T] mean_j |x - mu| after each step (compute dtype)
    trajectory_x: Optional[torch.Tensor] = None  # [N, T+1, d], initial state first
    trajectory_v: Optional[torch.Tensor] = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation dtype for an input dtype: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def needs_grad(*values) -> bool:
    """True when autograd will want gradients of any of these values (a tensor that requires
    grad, with grad mode on). It is the test that switches early exit off, in every backend."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in values)


def fold_parameters(b_h, b_x, b_v, mod_scale, mod_bias, exc_index, gamma, phi, amplitude, num_iterations, d,
                    dtype):
    """What the fused kernels take instead of the small raw parameters, built in torch so that
    autograd carries their gradients back: the [T, d] excitation table (None without excited
    dims), the combined bias b_h + b_x + b_v [H] and the 8 modulation scalars
    (mod_scale, mod_bias), all in `dtype`."""
    table = (excitation_table(exc_index, gamma, phi, amplitude, num_iterations, d, dtype=dtype)
             if exc_index.numel() > 0 else None)
    bias = b_h.to(dtype) + b_x.to(dtype) + b_v.to(dtype)
    return table, bias, torch.cat((mod_scale.to(dtype), mod_bias.to(dtype)))


def excitation_table(exc_index, gamma, phi, amplitude, num_iterations, d, dtype=None):
    """[T, d] table of the sparse excitation: row t holds amplitude·sin(gamma_k·t + phi_k) at
    column exc_index[k] and zeros elsewhere. Differentiable in gamma and phi; fused kernels add
    one row of it per step instead of evaluating sines per element."""
    dtype = dtype or compute_dtype(gamma.dtype)
    steps = torch.arange(num_iterations, device=gamma.device, dtype=dtype)
    values = amplitude * torch.sin(steps[:, None] * gamma.to(dtype)[None, :] + phi.to(dtype)[None, :])
    table = torch.zeros(num_iterations, d, device=gamma.device, dtype=dtype)
    return table.index_copy(1, exc_index.long(), values)


def iterate(h, x, *, w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o, mod_scale, mod_bias, mu,
            exc_index, gamma, phi, amplitude, dt, kappa, num_iterations, v=None,
            tol=None, min_iterations=3, return_trajectory=False):
    """Runs the iterate row by row in plain PyTorch; returns (x_T, IterateInfo)."""
    cd = compute_dtype(h.dtype)
    n, d = x.shape
    T = num_iterations
    f = lambda t: t.to(cd)  # noqa: E731
    w_x_, w_v_, w_o_, b_o_, mu_ = f(w_x), f(w_v), f(w_o), f(b_o), f(mu)
    ms, mb = f(mod_scale), f(mod_bias)
    exc_index = exc_index.long()
    exc_values = [amplitude * torch.sin(f(gamma) * t + f(phi)) for t in range(T)]

    xs = f(x)
    vs = f(v) if v is not None else torch.zeros_like(xs)
    # h enters every step through the same term: compute it once.
    context = f(h) @ f(w_h).t() + f(b_h) + f(b_x) + f(b_v)

    early_exit = tol is not None and not needs_grad(h, x, v, w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o,
                                                    mod_scale, mod_bias, mu, gamma, phi)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    iterations = torch.full((n,), T, dtype=torch.int32, device=x.device)
    energy, distance = [], []
    traj_x, traj_v = [xs], [vs]

    for t in range(T):
        c = torch.relu(context + xs @ w_x_.t() + vs @ w_v_.t())
        a, b, g, u = (c @ w_o_.t() + b_o_).split(d, dim=-1)
        alpha = torch.sigmoid(ms[0] * a + mb[0])
        beta = F.softplus(ms[1] * b + mb[1])
        gate = torch.sigmoid(ms[2] * g + mb[2])
        v_cand = ms[3] * u + mb[3]
        err = xs - mu_
        if kappa is not None:
            rms = err.pow(2).mean(dim=-1, keepdim=True).sqrt()
            alpha = alpha * (1 - torch.exp(-kappa * rms))
        v_new = alpha * vs + (1 - alpha) * v_cand - beta * err
        if exc_index.numel() > 0:
            v_new = v_new.index_add(1, exc_index, exc_values[t].expand(n, -1))
        x_new = xs + dt * gate * v_new

        if early_exit:
            keep = active[:, None]
            x_new = torch.where(keep, x_new, xs)
            v_new = torch.where(keep, v_new, vs)
            step = (x_new - xs).norm(dim=-1)
            converged = active & (step < tol) & (t + 1 >= min_iterations)
            iterations[converged] = t + 1
            active = active & ~converged

        xs, vs = x_new, v_new
        energy.append(vs.pow(2).mean(dim=-1))
        distance.append((xs - mu_).abs().mean(dim=-1))
        if return_trajectory:
            traj_x.append(xs)
            traj_v.append(vs)
        if early_exit and not bool(active.any()):
            # every row is frozen: the remaining steps would repeat the same state
            for _ in range(t + 1, T):
                energy.append(energy[-1])
                distance.append(distance[-1])
                if return_trajectory:
                    traj_x.append(xs)
                    traj_v.append(vs)
            break

    out_dtype = x.dtype
    info = IterateInfo(
        v=vs.to(out_dtype),
        iterations=iterations,
        energy=torch.stack(energy, dim=1),
        distance=torch.stack(distance, dim=1),
        trajectory_x=torch.stack(traj_x, dim=1).to(out_dtype) if return_trajectory else None,
        trajectory_v=torch.stack(traj_v, dim=1).to(out_dtype) if return_trajectory else None,
    )
    return xs.to(out_dtype), info
