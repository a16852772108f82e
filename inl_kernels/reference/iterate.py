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

import torch
import torch.nn.functional as F

from ..common import IterateInfo, IterateParams, IterateSettings, compute_dtype, excitation_table, needs_grad


def iterate(h, x, v, params: IterateParams, settings: IterateSettings):
    """Runs the iterate row by row in plain PyTorch; returns (x_T, IterateInfo)."""
    w_h, b_h, w_x, b_x, w_v, b_v, w_o, b_o, mod_scale, mod_bias, mu, exc_index, gamma, phi = params
    amplitude, dt, kappa, T = settings.amplitude, settings.dt, settings.kappa, settings.num_iterations
    tol, min_iterations, return_trajectory = settings.tol, settings.min_iterations, settings.return_trajectory
    cd = compute_dtype(h.dtype)
    n, d = x.shape
    f = lambda t: t.to(cd)  # noqa: E731
    w_x_, w_v_, w_o_, b_o_, mu_ = f(w_x), f(w_v), f(w_o), f(b_o), f(mu)
    ms, mb = f(mod_scale), f(mod_bias)
    # [T, d]: row t is amplitude·sin(gamma·t + phi) in the excited columns, 0 elsewhere. Added as a
    # dense row: inductor (torch 2.13, CPU) compiled the backward of the per-step
    # `v.index_add(1, exc_index, values.expand(n, -1))` wrong from T = 3 on (every gradient 1-5 %
    # off, the forward right); the same bits in the excited columns, v + 0 in the others
    exc_table = excitation_table(exc_index, gamma, phi, amplitude, T, d, dtype=cd) if exc_index.numel() > 0 else None

    xs = f(x)
    vs = f(v) if v is not None else torch.zeros_like(xs)
    # h enters every step through the same term: compute it once.
    context = f(h) @ f(w_h).t() + f(b_h) + f(b_x) + f(b_v)

    early_exit = tol is not None and not needs_grad(h, x, v, params)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    iterations = torch.full((n,), T, dtype=torch.int32, device=x.device)
    energy, distance = [], []
    traj_x, traj_v = [xs], [vs]

    for t in range(T):
        pre = context + xs @ w_x_.t()
        if t > 0 or v is not None:  # the velocity starts at zero: its product adds exact zeros
            pre = pre + vs @ w_v_.t()
        c = torch.relu(pre)
        a, b, g, u = (c @ w_o_.t() + b_o_).split(d, dim=-1)
        alpha = torch.sigmoid(ms[0] * a + mb[0])
        beta = F.softplus(ms[1] * b + mb[1])
        gate = torch.sigmoid(ms[2] * g + mb[2])
        v_cand = ms[3] * u + mb[3]
        err = xs - mu_
        if kappa is not None:
            # rms(err) with the norm's gradient convention at 0 (a zero one, as the fused backends
            # give): sqrt's derivative at 0 is inf, and inf·0 made x.grad and all of mu.grad NaN
            # for a row that starts at its equilibrium; the value is sqrt(mean err²) bit for bit
            mean_sq = err.pow(2).mean(dim=-1, keepdim=True)
            positive = mean_sq > 0
            rms = torch.where(positive, torch.where(positive, mean_sq, torch.ones_like(mean_sq)).sqrt(),
                              torch.zeros_like(mean_sq))
            alpha = alpha * (1 - torch.exp(-kappa * rms))
        v_new = alpha * vs + (1 - alpha) * v_cand - beta * err
        if exc_table is not None:
            v_new = v_new + exc_table[t]
        x_new = xs + dt * gate * v_new

        if early_exit:
            keep = active[:, None]
            x_new = torch.where(keep, x_new, xs)
            v_new = torch.where(keep, v_new, vs)
            step = (x_new - xs).norm(dim=-1)
            converged = active & (step < tol) & (t + 1 >= min_iterations)
            iterations = torch.where(converged, t + 1, iterations)
            active = active & ~converged

        xs, vs = x_new, v_new
        energy.append(vs.pow(2).mean(dim=-1))
        distance.append((xs - mu_).abs().mean(dim=-1))
        if return_trajectory:
            traj_x.append(xs)
            traj_v.append(vs)
        if early_exit and not torch.compiler.is_compiling() and not bool(active.any()):
            # every row is frozen: the remaining steps would repeat the same state (a shortcut
            # eager takes; a compiled graph runs every step, with the same result)
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
