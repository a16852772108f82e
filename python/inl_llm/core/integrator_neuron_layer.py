"""The original INL-LLM package's integrator layers (`inl_llm.core`), computed by our iterate.

Every layer here holds the parameters of SPEC §2 (a controller, the modulation, mu, the sparse
excitation) and runs the dynamics through `inl_kernels.inl_iterate`, so the math is the SPEC's
wherever the original package's code differs from it (README, "Compatibility with the original
package", lists each difference). For each row, one step t:

    c       = relu(h·w_hᵀ + b_h + x·w_xᵀ + b_x + v·w_vᵀ + b_v)
    a,b,g,u = split(c·w_oᵀ + b_o, 4)
    alpha   = sigmoid(a) · (1 − exp(−kappa · rms(x − mu)))        (the factor only with dynamic_alpha)
    v'      = alpha·v + (1 − alpha)·u − softplus(b)·(x − mu) + amplitude·sin(gamma·t + phi)
    x'      = x + dt · velocity_scale · sigmoid(g) · v'

The original lets the context h (hidden_dim) and the state x (output_dim) differ in width; the
iterate takes both at the state's width. So for hidden_dim ≠ output_dim the controller's context
term u = h·w_hᵀ is computed first and handed to the iterate as its context, with an identity
for w_h; when the state is narrower than the controller's hidden layer, the state is padded
with dims that stay exactly zero (zero mu, zero weights: they never move), and kappa, energy
and distance are rescaled so that rms and means still run over the real dims only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from inl_kernels import Controller, IterateInfo, inl_iterate
from inl_kernels.modules import spread_indices


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    return value


def controller_gains(controller: Controller, mod_scale: torch.Tensor, mod_bias: torch.Tensor,
                     h: torch.Tensor, x: torch.Tensor, v: torch.Tensor):
    """(alpha_base, beta, gate, v_cand), each [N, d], of one step from state (x, v) and context h:
    the controller's outputs under the modulation (what the iterate computes inside, here in
    plain torch for monitoring)."""
    c = torch.relu(controller.h_proj(h) + controller.x_proj(x) + controller.v_proj(v))
    a, b, g, u = controller.out(c).chunk(4, dim=-1)
    return (torch.sigmoid(mod_scale[0] * a + mod_bias[0]), F.softplus(mod_scale[1] * b + mod_bias[1]),
            torch.sigmoid(mod_scale[2] * g + mod_bias[2]), mod_scale[3] * u + mod_bias[3])


class StepAux(Mapping):
    """The original's per-step aux dict: 'alpha', 'alpha_base', 'beta', 'gate', 'v_cand',
    'error', 'mu'. The controller's gains are computed on first access only (the iterate does
    not return them), so a caller that never reads them pays nothing."""

    _GAINS = ("alpha", "alpha_base", "beta", "gate", "v_cand")

    def __init__(self, layer: "IntegratorCore", h, x, v, mu, extra: Optional[dict] = None):
        self._layer, self._inputs = layer, (h, x, v, mu)
        self._values = {"error": x - mu, "mu": mu, **(extra or {})}

    def _gains(self):
        h, x, v, mu = self._inputs
        layer = self._layer
        alpha_base, beta, gate, v_cand = controller_gains(layer.controller, layer.mod_scale, layer.mod_bias,
                                                          h, x, v)
        alpha = alpha_base
        if layer.dynamic_alpha:
            rms = (x - mu).pow(2).mean(-1, keepdim=True).sqrt()
            alpha = alpha_base * (1 - torch.exp(-layer.alpha_kappa * rms))
        self._values.update(alpha=alpha, alpha_base=alpha_base, beta=beta, gate=gate, v_cand=v_cand)

    def __getitem__(self, key):
        if key in self._GAINS and key not in self._values:
            self._gains()
        return self._values[key]

    def __iter__(self):
        return iter(list(self._values) + [k for k in self._GAINS if k not in self._values])

    def __len__(self):
        return len(set(self._values) | set(self._GAINS))


class IntegratorCore(nn.Module):
    """The parameters of one integrator and the call into `inl_iterate` that every compat layer
    shares. State width d = output_dim, context width hidden_dim. mu is one value per dim, or
    with `mu_group_size` hierarchical: mu_global + one offset per group (`get_mu()` expands it).
    The modulation is the identity (buffers): the original's single layers have none."""

    def __init__(self, hidden_dim: int, output_dim: int = 1, target_value: float = 5.0, dt: float = 0.1,
                 hidden_controller: int = 64, init_alpha: float = 0.8, init_beta: float = 0.5,
                 init_gate: float = 0.5, velocity_scale: float = 1.0, excitation_amplitude: float = 0.03,
                 excitation_sparsity: float = 1.0, learnable_mu: bool = True, mu_group_size: Optional[int] = None,
                 dynamic_alpha: bool = True, alpha_kappa: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        self.output_dim = d = _positive_int("output_dim", output_dim)
        _positive_int("hidden_controller", hidden_controller)
        if not 0.0 <= excitation_sparsity <= 1.0:
            raise ValueError(f"excitation_sparsity must lie in [0, 1], got {excitation_sparsity}")
        self.dt, self.velocity_scale = float(dt), float(velocity_scale)
        self.excitation_amplitude = float(excitation_amplitude)
        self.dynamic_alpha, self.alpha_kappa = bool(dynamic_alpha), float(alpha_kappa)
        self.target_value = float(target_value)
        self.backend = backend

        self.controller = Controller(d, hidden_controller, init_alpha, init_beta, init_gate)
        if hidden_dim != d:  # the context has its own width: only the controller's h layer sees it
            self.controller.h_proj = nn.Linear(hidden_dim, hidden_controller)
        self.register_buffer("mod_scale", torch.ones(4))
        self.register_buffer("mod_bias", torch.zeros(4))

        self.mu_group_size = mu_group_size
        if mu_group_size:
            mus = {"mu_global": torch.tensor(float(target_value)),
                   "mu_local_offsets": torch.zeros(math.ceil(d / mu_group_size))}
        else:
            mus = {"mu": torch.full((d,), float(target_value))}
        for name, value in mus.items():
            if learnable_mu:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self.learnable_mu = bool(learnable_mu)

        count = max(1, round(d * excitation_sparsity)) if excitation_sparsity > 0 else 0
        self.register_buffer("excited_indices", spread_indices(d, count))
        k = torch.arange(count, dtype=torch.float32)
        self.excitation_gamma = nn.Parameter(0.5 + k / max(count, 1))
        self.excitation_phi = nn.Parameter(2 * math.pi * k / max(count, 1))

    @property
    def num_excited(self) -> int:
        return self.excited_indices.numel()

    def get_mu(self) -> torch.Tensor:
        """mu expanded to [output_dim]."""
        if self.mu_group_size:
            return self.mu_global + self.mu_local_offsets.repeat_interleave(self.mu_group_size)[: self.output_dim]
        return self.mu

    def init_state(self, batch_size: int, device=None):
        """(x0, v0): x0 = mu for every row, v0 = 0, each [batch_size, output_dim]."""
        mu = self.get_mu()
        device = mu.device if device is None else device
        return mu.unsqueeze(0).expand(batch_size, -1).to(device), torch.zeros(batch_size, self.output_dim,
                                                                              device=device, dtype=mu.dtype)

    def _check(self, h, x, v):
        for name, t, width in (("h", h, self.hidden_dim), ("x", x, self.output_dim), ("v", v, self.output_dim)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 2 or t.shape[1] != width:
                raise ValueError(f"{name} must have shape [batch, {width}], got {list(t.shape)}")
            if t.shape[0] != h.shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} rows, h has {h.shape[0]}")

    def iterate(self, h: torch.Tensor, x: torch.Tensor, v: Optional[torch.Tensor] = None, num_iterations: int = 1,
                *, step: int = 0, tol: Optional[float] = None, min_iterations: int = 3,
                return_trajectory: bool = False, mu: Optional[torch.Tensor] = None):
        """num_iterations steps from (x, v) under context h, the first one at time `step` (its
        excitation is amplitude·sin(gamma·(step + t) + phi)). Early exit at `tol` as in the
        iterate (never while a gradient is needed). Returns (x_T, IterateInfo)."""
        self._check(h, x, v)
        d = self.output_dim
        w = self.controller.weights()
        mu = self.get_mu() if mu is None else mu
        phi = self.excitation_phi + self.excitation_gamma * step if step else self.excitation_phi
        kappa = self.alpha_kappa if self.dynamic_alpha else None
        args = dict(mod_scale=self.mod_scale, mod_bias=self.mod_bias, exc_index=self.excited_indices,
                    gamma=self.excitation_gamma, phi=phi, amplitude=self.excitation_amplitude,
                    dt=self.dt * self.velocity_scale, num_iterations=num_iterations, tol=tol,
                    min_iterations=min_iterations, backend=self.backend, return_info=True,
                    return_trajectory=return_trajectory)
        x, v, h = x.contiguous(), None if v is None else v.contiguous(), h.contiguous()
        if self.hidden_dim == d:
            return inl_iterate(h, x, **w, mu=mu, kappa=kappa, v=v, **args)

        # context of another width: the iterate gets u = h·w_hᵀ as its context and an identity w_h
        H = w["w_h"].shape[0]
        D = max(d, H)
        u = F.linear(h, w["w_h"]).to(x.dtype)  # autocast makes it bf16; the iterate takes x's dtype
        pad = D - d
        if pad:  # padded dims: zero state, zero mu, zero weights, so they stay zero at every step
            grow = lambda t: F.pad(t, (0, pad))  # noqa: E731
            x, v, mu = grow(x), None if v is None else grow(v), grow(mu)
            w = dict(w, w_x=grow(w["w_x"]), w_v=grow(w["w_v"]),
                     w_o=F.pad(w["w_o"].view(4, d, H), (0, 0, 0, pad)).reshape(4 * D, H),
                     b_o=F.pad(w["b_o"].view(4, d), (0, pad)).reshape(4 * D))
            kappa = None if kappa is None else kappa * math.sqrt(D / d)  # rms over D dims = sqrt(d/D)·rms over d
        w["w_h"] = torch.eye(H, D, dtype=u.dtype, device=u.device)
        x_out, info = inl_iterate(F.pad(u, (0, D - H)).contiguous(), x, **w, mu=mu, kappa=kappa, v=v, **args)
        if not pad:
            return x_out, info
        scale = D / d
        return x_out[:, :d], IterateInfo(
            info.v[:, :d], info.iterations, info.energy * scale, info.distance * scale,
            None if info.trajectory_x is None else info.trajectory_x[..., :d],
            None if info.trajectory_v is None else info.trajectory_v[..., :d])

    def step_aux(self, h, x, v, mu=None, extra: Optional[dict] = None) -> StepAux:
        return StepAux(self, h, x, v, self.get_mu() if mu is None else mu, extra)


class IntegratorNeuronLayer(IntegratorCore):
    """The original's base layer: one integration step per call.

    forward(h [B, hidden_dim], x [B, output_dim], v [B, output_dim], step=0) -> (x_next, v_next,
    aux) with aux the original's dict ('alpha', 'alpha_base', 'beta', 'gate', 'v_cand', 'error',
    'mu'). `step` sets the excitation's time (the original advanced a hidden counter instead).
    Excitation runs on every dim, as in the original (excitation_sparsity=1.0)."""

    def __init__(self, hidden_dim: int, output_dim: int = 1, target_value: float = 5.0, dt: float = 0.1,
                 hidden_controller: int = 64, init_alpha: float = 0.8, init_beta: float = 0.5,
                 init_gate: float = 0.5, velocity_scale: float = 1.0, excitation_amplitude: float = 0.03,
                 learnable_mu: bool = True, mu_adaptation_rate: float = 1e-4, dynamic_alpha: bool = True,
                 alpha_kappa: float = 1.0, excitation_sparsity: float = 1.0, backend: str = "auto"):
        super().__init__(hidden_dim, output_dim, target_value, dt, hidden_controller, init_alpha, init_beta,
                         init_gate, velocity_scale, excitation_amplitude, excitation_sparsity, learnable_mu,
                         None, dynamic_alpha, alpha_kappa, backend)
        # stored as the original does; like the original's code, nothing applies it (our model's
        # EMA is INLConfig.mu_ema_rate)
        self.mu_adaptation_rate = mu_adaptation_rate

    def forward(self, h: torch.Tensor, x: torch.Tensor, v: torch.Tensor, step: int = 0, return_aux: bool = True):
        x_next, info = self.iterate(h, x, v, 1, step=step)
        return x_next, info.v, (self.step_aux(h, x, v) if return_aux else None)


class IntegratorModel(nn.Module):
    """The original's regression model: backbone MLP → IntegratorNeuronLayer run for
    num_iterations steps from x0 = mu → identity-initialised linear readout.

    forward(inputs [B, input_dim], return_trajectory=False) -> (output [B, output_dim],
    trajectory or None); trajectory = {'x': [B, T+1, output_dim], 'v': same, 'aux': one aux
    dict per step}. All T steps are one call of the iterate."""

    def __init__(self, input_dim: int, hidden_dim: int = 128, num_layers: int = 2, num_iterations: int = 10,
                 output_dim: int = 1, target_value: float = 5.0, **inl_kwargs):
        super().__init__()
        self.input_dim = _positive_int("input_dim", input_dim)
        self.hidden_dim, self.output_dim = hidden_dim, output_dim
        self.num_iterations = _positive_int("num_iterations", num_iterations)
        self.target_value = target_value
        layers, width = [], input_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU(), nn.LayerNorm(hidden_dim)]
            width = hidden_dim
        self.backbone = nn.Sequential(*layers)
        self.inl = IntegratorNeuronLayer(hidden_dim=hidden_dim, output_dim=output_dim, target_value=target_value,
                                         **inl_kwargs)
        self.readout = nn.Linear(output_dim, output_dim)
        with torch.no_grad():
            self.readout.weight.copy_(torch.eye(output_dim))
            self.readout.bias.zero_()

    def _run(self, inputs, return_trajectory):
        if inputs.dim() != 2 or inputs.shape[1] != self.input_dim:
            raise ValueError(f"inputs must have shape [batch, {self.input_dim}], got {list(inputs.shape)}")
        h = self.backbone(inputs)
        x0, v0 = self.inl.init_state(inputs.shape[0], inputs.device)
        x_T, info = self.inl.iterate(h, x0.contiguous(), v0, self.num_iterations,
                                     return_trajectory=return_trajectory)
        return h, x_T, info

    def forward(self, inputs: torch.Tensor, return_trajectory: bool = False):
        h, x_T, info = self._run(inputs, return_trajectory)
        output = self.readout(x_T)
        if not return_trajectory:
            return output, None
        xs, vs = info.trajectory_x, info.trajectory_v
        aux = [self.inl.step_aux(h, xs[:, t], vs[:, t]) for t in range(self.num_iterations)]
        return output, {"x": xs, "v": vs, "aux": aux}

    def get_final_state(self, inputs: torch.Tensor) -> torch.Tensor:
        """x_T before the readout."""
        return self._run(inputs, False)[1]

    def get_learned_mu(self) -> Optional[torch.Tensor]:
        """mu when it is learnable, else None."""
        return self.inl.get_mu() if self.inl.learnable_mu else None
