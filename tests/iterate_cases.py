"""Argument builders for iterate tests, shared by every backend's tests."""
from __future__ import annotations

import torch

from inl_kernels.modules import spread_indices


def make_args(n=6, d=20, H=16, E=3, T=4, dtype=torch.float64, seed=0, with_v=True, kappa=0.7,
              amplitude=0.05, dt=0.3, device="cpu", scale=0.4):
    """Random but well-conditioned iterate arguments: (h, x, kwargs)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(dtype).to(device)  # noqa: E731
    kw = dict(
        w_h=r(H, d, std=scale / d ** 0.5), b_h=r(H, std=0.1),
        w_x=r(H, d, std=scale / d ** 0.5), b_x=r(H, std=0.1),
        w_v=r(H, d, std=scale / d ** 0.5), b_v=r(H, std=0.1),
        w_o=r(4 * d, H, std=scale / H ** 0.5), b_o=r(4 * d, std=0.3),
        mod_scale=(1 + r(4, std=0.1)), mod_bias=r(4, std=0.1), mu=r(d, std=0.3),
        exc_index=spread_indices(d, E).to(device), gamma=(0.5 + r(E, std=0.2)), phi=r(E),
        amplitude=amplitude, dt=dt, kappa=kappa, num_iterations=T,
        v=r(n, d, std=0.5) if with_v else None,
    )
    return r(n, d), r(n, d), kw


CONVERGE_TOL = 3e-3  # with converging_args(), rows stop anywhere between step 4 and never


def converging_args(n=8, d=24, H=16, T=12, dtype=torch.float64, seed=1, device="cpu"):
    """Arguments whose rows settle at different speeds: rows are scaled so the early rows start
    near equilibrium and the late ones far from it, with strong damping."""
    h, x, kw = make_args(n=n, d=d, H=H, E=2, T=T, dtype=dtype, seed=seed, with_v=False, kappa=None,
                         amplitude=0.0, dt=0.5, device=device, scale=0.1)
    kw["mod_bias"] = torch.tensor([-2.0, 1.0, 1.0, 0.0], dtype=dtype, device=device)  # low alpha, strong beta
    kw["mod_scale"] = torch.tensor([1.0, 1.0, 1.0, 0.05], dtype=dtype, device=device)  # small v_cand
    row_scale = torch.logspace(-3, 0.5, n, dtype=torch.float64).to(dtype).to(device)[:, None]
    x = kw["mu"] + (x - kw["mu"]) * row_scale
    return h, x, kw


GRAD_NAMES = ("w_h", "b_h", "w_x", "b_x", "w_v", "b_v", "w_o", "b_o", "mod_scale", "mod_bias", "mu",
              "gamma", "phi")
