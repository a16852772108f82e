"""The original package's IntegratorLoss (its arguments, its call and its returned components),
computing the seeds' terms from x/v trajectories.

For a trajectory x, v [N, T+1, d] (the initial state first) with equilibrium mu [d]:

    L_task   = MSE(predictions, targets)  or  cross_entropy (task_loss_type='ce', ignore_index -100)
    L_mean   = λ_mean(epoch) · Σ_i w_i · (mean_n x_T[n, i] − mu_i)²,  w_i = 1 / (1 + Var_n x_T[n, i])
               (population variance; w held constant in the gradient; w_i = 1 without variance_weighted)
    L_speed  = λ_speed · Σ_{t=1..T} exp(−(t−1)/τ) · mean_{n,j} |x_t − mu|          (τ = 2)
    L_energy = λ_energy · mean_{n, t=1..T, j} |v_t|^p                                (p = energy_p = 2)
    total    = sum of the above

mu is `learned_mu` when given, else the trajectory's own 'mu' (our models put each layer's
equilibrium there), else `target_value`. A list of trajectories (one per layer) averages each
term over the layers. These are the terms of `inl_llm.IntegratorLoss` (they equal its terms on
the same model, computed there from the iterate's statistics): the original's code differs
(README, "Compatibility with the original package").

λ_mean(epoch) = exploration_lambda_mean in an exploration phase, else lambda_mean_init · f(epoch)
with f = annealing_factor^p (exponential) or 1 − p·(1 − annealing_factor) (linear),
p = min(1, epoch / annealing_epochs). λ_energy = exploration_lambda_energy in exploration.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("exponential", "linear")
TASK_LOSSES = ("mse", "ce")


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., T+1, d] -> [rows, T+1, d] (our models give [B, S, T+1, d])."""
    return t.reshape(-1, *t.shape[-2:])


class IntegratorLoss(nn.Module):
    def __init__(self, target_value: float = 5.0, lambda_mean_init: float = 1.0, lambda_speed: float = 0.1,
                 lambda_energy: float = 0.01, energy_p: float = 2.0, annealing_schedule: str = "exponential",
                 annealing_factor: float = 0.1, annealing_epochs: int = 100, variance_weighted: bool = True,
                 exploration_phase: bool = False, exploration_lambda_mean: float = 0.05,
                 exploration_lambda_energy: float = 0.001, task_loss_type: str = "mse", tau: float = 2.0,
                 ignore_index: int = -100):
        super().__init__()
        if annealing_schedule not in SCHEDULES:
            raise ValueError(f"annealing_schedule must be one of {SCHEDULES}, got {annealing_schedule!r}")
        if task_loss_type not in TASK_LOSSES:
            raise ValueError(f"task_loss_type must be one of {TASK_LOSSES}, got {task_loss_type!r}")
        if annealing_epochs <= 0 or tau <= 0:
            raise ValueError(f"annealing_epochs and tau must be > 0, got {annealing_epochs} and {tau}")
        self.target_value = target_value
        self.lambda_mean_init, self.lambda_speed, self.lambda_energy = lambda_mean_init, lambda_speed, lambda_energy
        self.energy_p, self.tau = energy_p, tau
        self.annealing_schedule, self.annealing_factor = annealing_schedule, annealing_factor
        self.annealing_epochs = annealing_epochs
        self.variance_weighted = variance_weighted
        self.exploration_phase = bool(exploration_phase)
        self.exploration_lambda_mean = exploration_lambda_mean
        self.exploration_lambda_energy = exploration_lambda_energy
        self.task_loss_type, self.ignore_index = task_loss_type, ignore_index

    def set_exploration_phase(self, is_exploration: bool):
        """True in an exploration phase (the scheduler's phase_info['is_exploration'])."""
        self.exploration_phase = bool(is_exploration)

    def get_lambda_mean(self, epoch: float) -> float:
        """λ_mean of the equilibrium phase at `epoch` (annealed)."""
        p = min(1.0, max(0.0, epoch / self.annealing_epochs))
        if self.annealing_schedule == "exponential":
            return self.lambda_mean_init * self.annealing_factor ** p
        return self.lambda_mean_init * (1 - p * (1 - self.annealing_factor))

    def current_lambda_mean(self, epoch: float) -> float:
        return self.exploration_lambda_mean if self.exploration_phase else self.get_lambda_mean(epoch)

    def current_lambda_energy(self) -> float:
        return self.exploration_lambda_energy if self.exploration_phase else self.lambda_energy

    def compute_L_task(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task_loss_type == "ce":
            return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=self.ignore_index)
        return F.mse_loss(predictions, targets)

    def compute_L_mean(self, x_final: torch.Tensor, epoch: float = 0,
                       learned_mu: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_final [N, d] -> λ_mean(epoch) · Σ_i w_i (mean_n x_final − mu_i)²."""
        x = _wide(x_final.reshape(-1, x_final.shape[-1]))
        mu = learned_mu if learned_mu is not None else self.target_value
        mu = _wide(mu) if isinstance(mu, torch.Tensor) else mu
        w = 1.0 / (1.0 + x.detach().var(dim=0, unbiased=False)) if self.variance_weighted else 1.0
        return self.current_lambda_mean(epoch) * (w * (x.mean(dim=0) - mu) ** 2).sum()

    def compute_L_speed(self, x_trajectory: torch.Tensor, mu=None) -> torch.Tensor:
        """x_trajectory [N, T+1, d] -> λ_speed · Σ_t exp(−(t−1)/τ) mean |x_t − mu|."""
        xs = _wide(_rows(x_trajectory))[:, 1:]
        mu = self.target_value if mu is None else (_wide(mu) if isinstance(mu, torch.Tensor) else mu)
        distance = (xs - mu).abs().mean(dim=(0, 2))  # [T]
        decay = torch.exp(-torch.arange(distance.numel(), device=xs.device, dtype=xs.dtype) / self.tau)
        return self.lambda_speed * (decay * distance).sum()

    def compute_L_energy(self, v_trajectory: torch.Tensor) -> torch.Tensor:
        """v_trajectory [N, T+1, d] -> λ_energy · mean |v_t|^p over the steps t = 1..T."""
        vs = _wide(_rows(v_trajectory))[:, 1:]
        return self.current_lambda_energy() * vs.abs().pow(self.energy_p).mean()

    def _terms(self, trajectory: dict, epoch: float, learned_mu):
        xs, vs = _rows(trajectory["x"]), trajectory["v"]
        mu = learned_mu if learned_mu is not None else trajectory.get("mu")
        return (self.compute_L_mean(xs[:, -1], epoch, mu), self.compute_L_speed(xs, mu),
                self.compute_L_energy(vs))

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor,
                trajectory: Optional[Union[dict, Sequence[dict]]] = None, epoch: float = 0,
                learned_mu: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """-> {'L_task', and with a trajectory 'L_mean', 'L_speed', 'L_energy'; 'total',
        'lambda_mean'}. trajectory: a dict with 'x', 'v' [.., T+1, d] (and optionally 'mu'), or a
        list of them (one per layer: each term averaged over the layers)."""
        losses = {"L_task": self.compute_L_task(predictions, targets)}
        if trajectory is not None:
            layers = [trajectory] if isinstance(trajectory, Mapping) else list(trajectory)
            if not layers:
                raise ValueError("trajectory is an empty list: call the model with return_aux=True")
            terms = [self._terms(t, epoch, learned_mu) for t in layers]
            for i, name in enumerate(("L_mean", "L_speed", "L_energy")):
                losses[name] = torch.stack([t[i] for t in terms]).mean()
        losses["total"] = sum(losses.values())
        losses["lambda_mean"] = torch.tensor(self.current_lambda_mean(epoch))
        return losses


def compute_convergence_metrics(x_trajectory: torch.Tensor, target_value: float = 5.0,
                                epsilon: float = 0.1) -> Dict[str, float]:
    """Convergence of a trajectory [N, T+1, d] toward target_value:
    time_to_converge (mean over rows of the first step t ≥ 1 at which every dim lies within
    epsilon of the target; T when it never does), final_rmse, final_mean, final_std (over all
    of x_T), fraction_converged (share of x_T's entries within epsilon)."""
    xs = _rows(x_trajectory).detach().double()
    T = xs.shape[1] - 1
    final = xs[:, -1]
    inside = ((xs[:, 1:] - target_value).abs() <= epsilon).all(dim=-1)  # [N, T]
    never = torch.full((xs.shape[0],), T, dtype=torch.long, device=xs.device)
    first = torch.where(inside.any(dim=1), inside.long().argmax(dim=1) + 1, never)
    return {
        "time_to_converge": first.double().mean().item(),
        "final_rmse": (final - target_value).pow(2).mean().sqrt().item(),
        "final_mean": final.mean().item(),
        "final_std": final.std().item(),
        "fraction_converged": ((final - target_value).abs() <= epsilon).double().mean().item(),
    }
