"""The original package's Level-2 optimizations (`inl_llm.optimizations.advanced_optimizations`):
a controller shared by every layer with per-layer modulation, sparse harmonic excitation,
hierarchical equilibrium, a mixture of integrators, and the parameter-count report. The
integrators run SPEC §2's full dynamics through our iterate (see inl_llm.core.integrator_neuron_layer).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from inl_kernels import Controller

from ..core.integrator_neuron_layer import IntegratorCore, _positive_int, controller_gains


class SharedController(nn.Module):
    """One controller MLP for num_layers layers plus 4 scales and 4 biases per layer:
    forward(h, x, v, layer_idx) -> (alpha, beta, gate, v_cand), each [batch, output_dim], with
    alpha = sigmoid(s0·a + b0), beta = softplus(s1·b + b1), gate = sigmoid(s2·g + b2),
    v_cand = s3·u + b3 and (a, b, g, u) = split(relu(h·w_hᵀ + x·w_xᵀ + v·w_vᵀ + biases)·w_oᵀ + b_o)."""

    def __init__(self, hidden_dim: int, output_dim: int, num_layers: int, hidden_controller: int = 64):
        super().__init__()
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        self.output_dim = _positive_int("output_dim", output_dim)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.controller = Controller(output_dim, _positive_int("hidden_controller", hidden_controller))
        if hidden_dim != output_dim:
            self.controller.h_proj = nn.Linear(hidden_dim, hidden_controller)
        self.layer_scalers = nn.Parameter(torch.ones(num_layers, 4))
        self.layer_biases = nn.Parameter(torch.zeros(num_layers, 4))

    def forward(self, h: torch.Tensor, x: torch.Tensor, v: torch.Tensor, layer_idx: int):
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must lie in [0, {self.num_layers}), got {layer_idx}")
        return controller_gains(self.controller, self.layer_scalers[layer_idx], self.layer_biases[layer_idx], h, x, v)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SparseHarmonicINL(IntegratorCore):
    """An integrator whose harmonic excitation reaches `sparsity` of its dims (evenly spread,
    fixed): forward(h, x, v, step=0) -> (x_next, v_next, aux)."""

    def __init__(self, hidden_dim: int, output_dim: int, sparsity: float = 0.1, target_value: float = 5.0,
                 dt: float = 0.1, excitation_amplitude: float = 0.03):
        super().__init__(hidden_dim, output_dim, target_value, dt, excitation_amplitude=excitation_amplitude,
                         excitation_sparsity=sparsity)
        self.sparsity = sparsity

    def forward(self, h, x, v, step: int = 0, return_aux: bool = True):
        x_next, info = self.iterate(h, x, v, 1, step=step)
        return x_next, info.v, (self.step_aux(h, x, v) if return_aux else None)


class HierarchicalEquilibriumINL(IntegratorCore):
    """An integrator whose mu is mu_global + one offset per group of `group_size` dims (get_mu()
    expands it), with the seeds' sparse excitation (10 % of dims): forward(h, x, v, step=0) ->
    (x_next, v_next, aux with 'mu', 'mu_global', 'mu_offsets')."""

    def __init__(self, hidden_dim: int, output_dim: int, group_size: int = 64, target_value: float = 5.0,
                 dt: float = 0.1, excitation_sparsity: float = 0.1, excitation_amplitude: float = 0.03):
        super().__init__(hidden_dim, output_dim, target_value, dt, excitation_amplitude=excitation_amplitude,
                         excitation_sparsity=excitation_sparsity, mu_group_size=_positive_int("group_size", group_size))
        self.group_size = group_size

    def forward(self, h, x, v, step: int = 0, return_aux: bool = True):
        x_next, info = self.iterate(h, x, v, 1, step=step)
        if not return_aux:
            return x_next, info.v, None
        return x_next, info.v, self.step_aux(h, x, v, extra={"mu_global": self.mu_global,
                                                             "mu_offsets": self.mu_local_offsets})

    def num_mu_parameters(self) -> int:
        return 1 + self.mu_local_offsets.numel()


class MixtureOfIntegrators(nn.Module):
    """num_experts integrators sharing one mu; a linear router on the context h picks top_k per
    row (softmax weights renormalised over the k), rows are grouped per expert by one sort and
    each expert runs once on its rows: forward(h, x, v, step=0) -> (x_next, v_next, aux) with
    x_next, v_next the routing-weighted sums and aux = {'router_probs' [B, E], 'top_k_experts'
    [B, k], 'expert_weights' [B, k], 'load_balance' (E · Σ_e f_e·P_e, the Switch term)}."""

    def __init__(self, hidden_dim: int, output_dim: int, num_experts: int = 8, top_k: int = 2,
                 target_value: float = 5.0, dt: float = 0.1):
        super().__init__()
        self.hidden_dim, self.output_dim = _positive_int("hidden_dim", hidden_dim), _positive_int("output_dim",
                                                                                                 output_dim)
        self.num_experts, self.top_k = _positive_int("num_experts", num_experts), _positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        self.dt = dt
        self.mu = nn.Parameter(torch.full((output_dim,), float(target_value)))
        self.router = nn.Linear(hidden_dim, num_experts)
        # the experts' own mu is never used (they run with the shared one): a buffer, not a parameter
        self.experts = nn.ModuleList(IntegratorCore(hidden_dim, output_dim, target_value, dt, learnable_mu=False,
                                                    excitation_sparsity=0.1) for _ in range(num_experts))

    def init_state(self, batch_size: int, device=None):
        device = self.mu.device if device is None else device
        return (self.mu.unsqueeze(0).expand(batch_size, -1).to(device),
                torch.zeros(batch_size, self.output_dim, device=device, dtype=self.mu.dtype))

    def forward(self, h, x, v, step: int = 0):
        if h.dim() != 2 or h.shape[-1] != self.hidden_dim:
            raise ValueError(f"h must be [batch, hidden_dim={self.hidden_dim}], got {list(h.shape)}")
        for name, t in (("x", x), ("v", v)):
            if t.dim() != 2 or t.shape != (h.shape[0], self.output_dim):
                raise ValueError(f"{name} must be [batch, output_dim] = [{h.shape[0]}, {self.output_dim}] with h's "
                                 f"rows, got {list(t.shape)}")
        n, E, k = x.shape[0], self.num_experts, self.top_k
        probs = torch.softmax(self.router(h).float(), dim=-1)
        weights, chosen = probs.topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        flat, w_flat = chosen.flatten(), weights.flatten()  # slot = row·k + j
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()
        x_next, v_next = torch.zeros_like(x), torch.zeros_like(v)
        for expert, slots in zip(self.experts, order.split(counts)):
            if slots.numel() == 0:
                continue
            rows, w = slots // k, w_flat[slots].to(x.dtype)[:, None]
            y, info = expert.iterate(h[rows], x[rows], v[rows], 1, step=step, mu=self.mu)
            x_next = x_next.index_add(0, rows, y * w)
            v_next = v_next.index_add(0, rows, info.v * w)
        share = torch.bincount(flat, minlength=E).to(probs.dtype) / max(n * k, 1)
        aux = {"router_probs": probs, "top_k_experts": chosen, "expert_weights": weights,
               "load_balance": E * (share * probs.mean(0)).sum()}
        return x_next, v_next, aux


def compute_advanced_optimization_gains(d_model: int = 2048, num_layers: int = 24, hidden_controller: int = 64,
                                        group_size: int = 64, sparsity: float = 0.1) -> dict:
    """Prints and returns the parameters a shared controller and a hierarchical mu save, counted
    for this package's modules (biases included): a controller is 3·(d·H + H) + H·4d + 4d
    parameters; sharing one across L layers costs one controller plus 8 modulation scalars per
    layer instead of L controllers; a hierarchical mu is 1 + ceil(d / group) values instead of d."""
    d, H, L = d_model, hidden_controller, num_layers
    controller = 3 * (d * H + H) + H * 4 * d + 4 * d
    standard, shared = L * controller, controller + 8 * L
    groups = math.ceil(d / group_size)
    excited = max(1, round(d * sparsity))
    gains = {"standard_controller_params": standard, "shared_controller_params": shared,
             "controller_reduction_percent": 100 * (1 - shared / standard),
             "standard_mu_params": d, "hierarchical_mu_params": 1 + groups,
             "mu_reduction_percent": 100 * (1 - (1 + groups) / d), "excited_dims": excited}
    print(f"shared controller: {shared:,} parameters instead of {standard:,} for {L} layers "
          f"({gains['controller_reduction_percent']:.1f}% fewer)")
    print(f"hierarchical mu: {1 + groups} parameters instead of {d} ({gains['mu_reduction_percent']:.1f}% fewer)")
    print(f"sparse excitation: {excited} of {d} dims excited")
    return gains
