"""Argument builders for iterate tests, shared by every backend's tests."""
from __future__ import annotations

import torch

from inl_kernels import inl_iterate
from inl_kernels.common import iterate_bundle
from inl_kernels.modules import spread_indices
from inl_kernels.reference import iterate as _reference


def call_backend(fn, h, x, **kw):
    """A backend's `iterate(h, x, v, params, settings, **options)` called with inl_iterate's
    keyword arguments (test-only hooks such as `_path`, `_config` pass through)."""
    options = {k: kw.pop(k) for k in list(kw) if k.startswith("_")}
    return fn(*iterate_bundle(h, x, **kw), **options)


def reference_iterate(h, x, **kw):
    """The fp64-capable reference oracle with inl_iterate's keyword arguments."""
    return call_backend(_reference, h, x, **kw)


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


def cast(kw, dtype, device=None):
    """The tensors of `kw` moved to `device` (when given), the floating ones also to `dtype`;
    everything else (index tensors, floats, None) as it is."""
    def to(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device or t.device, dtype=dtype if t.is_floating_point() else t.dtype)
    return {k: to(t) for k, t in kw.items()}


# (argument, index, T, kappa): where one NaN goes, and the run it goes into. A NaN in a row of
# h, x or v stays in that row; one in w_h, w_x or a bias reaches every row. With T = 1 and no
# kappa, a NaN in one output column of w_o or b_o, in mu or in gamma stays in that column of
# x_T and v (the statistics, means over columns, become NaN): the kernel must spread it no
# further than the reference does. With kappa, a NaN in mu reaches every column through rms.
NAN_CASES = [
    ("h", (1, 3), 3, 0.7),
    ("x", (2, 0), 3, 0.7),
    ("v", (0, 19), 2, None),
    ("w_h", (2, 5), 2, 0.7),
    ("w_x", (0, 7), 2, None),
    ("b_v", (3,), 2, 0.7),
    ("w_o", (3 * 20 + 4, 2), 1, None),  # v_cand of column 4
    ("w_o", (0 * 20 + 9, 5), 1, None),  # alpha of column 9
    ("b_o", (1 * 20 + 6,), 1, None),  # beta of column 6
    ("b_o", (2 * 20 + 11,), 1, None),  # gate of column 11
    ("mu", (4,), 1, None),
    ("mu", (4,), 2, 0.7),
    ("gamma", (1,), 1, None),
    ("mod_scale", (2,), 1, None),
]


def nan_case(name, index, T, kappa, dtype=torch.float32, device="cpu"):
    """Arguments (n = 6, d = 20, H = 16, E = 3) in `dtype` with one NaN at kw[name][index]
    (or h / x): (h, x, kw)."""
    h, x, kw = make_args(n=6, d=20, H=16, E=3, T=T, kappa=kappa, dtype=torch.float64)
    kw = dict(kw, h=h, x=x)
    kw[name] = kw[name].clone()
    kw[name][index] = float("nan")
    kw = cast(kw, dtype, device)
    return kw.pop("h"), kw.pop("x"), kw


def assert_nan_where_reference(backend, h, x, kw, precision=1e-5, **extra):
    """The backend's x_T, v, energy and distance are NaN exactly where the reference's are (the
    reference runs in fp64 on the same values), equal to it within `precision` elsewhere, and
    stop after the same number of steps. `extra`: more inl_iterate arguments (tol, ...). Returns
    the reference's (x_T, info)."""
    out, info = inl_iterate(h, x, **kw, **extra, return_info=True, backend=backend)
    ref, rinfo = inl_iterate(h.double(), x.double(), **cast(kw, torch.float64), **extra, return_info=True,
                             backend="reference")
    assert torch.isnan(ref).any(), "the case puts no NaN in the reference's output"
    for name, a, b in (("x_T", out, ref), ("v", info.v, rinfo.v), ("energy", info.energy, rinfo.energy),
                       ("distance", info.distance, rinfo.distance)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (
            f"{name}: NaN at {torch.isnan(a).nonzero().tolist()}, reference at {torch.isnan(b).nonzero().tolist()}")
        torch.testing.assert_close(a.double(), b, rtol=precision, atol=precision, equal_nan=True, msg=name)
    assert info.iterations.tolist() == rinfo.iterations.tolist()
    return ref, rinfo
