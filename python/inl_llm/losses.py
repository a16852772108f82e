"""IntegratorLoss: the task loss plus the seeds' three integrator terms, computed from the
statistics the iterate returns (x_T, mu, info.energy, info.distance; SPEC §2), never from a
stored trajectory.

For the J integrators of the model (one per block, one per expert of a mixture), each with
final states x [n, d], equilibrium mu [d] and per-step statistics energy, distance [n, T]:

    L_task   = cross_entropy(logits, targets)                       (ignore_index -100)
    L_mean   = λ_mean(epoch) · (1/J) Σ_j Σ_i w_ji · (mean_n x_j[n, i] − mu_j[i])²
               w_ji = 1 / (1 + Var_n x_j[n, i])   (population variance; a constant weight:
               no gradient flows through it, so a neuron cannot lower its penalty by
               growing its variance)
    L_speed  = λ_speed · (1/J) Σ_j Σ_t exp(−t/τ) · mean_n distance_j[n, t]    (t = 0 is the
               state after the first step: early steps weigh most)
    L_energy = λ_energy · (1/J) Σ_j mean_{n,t} energy_j[n, t]
    L_balance = λ_balance · the router's load-balancing term (mixture of integrators only)
    total    = L_task + L_mean + L_speed + L_energy + L_balance

The seeds apply the terms to one layer; averaging over every integrator is our extension.

Under data parallelism (`process_group` set, as the trainer does) the batch mean and variance of
L_mean are taken over the global batch (all ranks' rows, through a differentiable all-reduce), so
W ranks of n rows give the loss and gradients of one process with all W·n rows. Every other term
is a mean over rows, which the gradient averaging of DDP/FSDP already makes global. A mixture of
integrators routes different rows to an expert on each rank: there every term (and the router
balance) is taken over all ranks' rows, each rank listing every expert (with no rows where it got
none), so the ranks issue the same collectives and reproduce one process
(`_mixture_terms_over_ranks`).

λ_mean(epoch) = level · (r + (1 − r) · max(0, 1 − epoch / annealing_epochs)), r = final / init:
the annealing scales the level from 1× down to r× (seeds: 1.0 → 0.1 over 100 epochs). The
level is lambda_mean_init, or exploration_lambda_mean in an exploration phase, or what the cycle
scheduler's phase sets (seeds' balanced preset: equilibrium 0.5, exploration 0.05). λ_energy is
lambda_energy, exploration_lambda_energy in exploration (0.01 / 0.001), or the phase's value.
`epoch` is in the scheduler's unit (epochs or steps), the same unit as annealing_epochs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32 for fp16/bf16/fp32 statistics, fp64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _SumOverRanks(torch.autograd.Function):
    """y = Σ_ranks x. Every rank then computes the same loss L(y), so ∂L/∂x on a rank is
    Σ_ranks ∂L/∂y: the backward sums too. (DDP/FSDP then average the parameter gradients over
    the W ranks, which gives exactly the gradient of the single-process loss.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class IntegratorLoss(nn.Module):
    def __init__(self, lambda_mean_init: float = 1.0, lambda_mean_final: float = 0.1, annealing_epochs: float = 100,
                 lambda_speed: float = 0.1, tau: float = 2.0, lambda_energy: float = 0.01,
                 exploration_lambda_mean: float = 0.05, exploration_lambda_energy: float = 0.001,
                 lambda_balance: float = 0.01, variance_weighted: bool = True, ignore_index: int = -100):
        super().__init__()
        if lambda_mean_init <= 0 and lambda_mean_final != 0:
            raise ValueError("lambda_mean_init must be > 0 (it is the annealing's starting level)")
        if annealing_epochs <= 0 or tau <= 0:
            raise ValueError(f"annealing_epochs and tau must be > 0, got {annealing_epochs} and {tau}")
        self.lambda_mean_init, self.lambda_mean_final = lambda_mean_init, lambda_mean_final
        self.annealing_epochs = annealing_epochs
        self.lambda_speed, self.tau = lambda_speed, tau
        self.lambda_energy = lambda_energy
        self.exploration_lambda_mean = exploration_lambda_mean
        self.exploration_lambda_energy = exploration_lambda_energy
        self.lambda_balance = lambda_balance
        self.variance_weighted = variance_weighted
        self.ignore_index = ignore_index
        self.is_exploration = False
        self.process_group = None  # a torch.distributed group: L_mean's batch statistics span its ranks
        self._phase_lambda_mean: Optional[float] = None
        self._phase_lambda_energy: Optional[float] = None

    def set_phase(self, is_exploration: bool, lambda_mean: Optional[float] = None,
                  lambda_energy: Optional[float] = None):
        """Switches between equilibrium and exploration; a scheduler's phase may also set the
        λ_mean level and λ_energy (None keeps the loss's own value for that phase)."""
        self.is_exploration = bool(is_exploration)
        self._phase_lambda_mean, self._phase_lambda_energy = lambda_mean, lambda_energy

    def lambda_mean(self, epoch: float) -> float:
        level = self._phase_lambda_mean
        if level is None:
            level = self.exploration_lambda_mean if self.is_exploration else self.lambda_mean_init
        r = self.lambda_mean_final / self.lambda_mean_init if self.lambda_mean_init else 1.0
        return level * (r + (1 - r) * max(0.0, 1 - epoch / self.annealing_epochs))

    def current_lambda_energy(self) -> float:
        if self._phase_lambda_energy is not None:
            return self._phase_lambda_energy
        return self.exploration_lambda_energy if self.is_exploration else self.lambda_energy

    def _batch_mean_var(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dim mean (differentiable) and population variance (no gradient) of x [n, d] over
        the batch: this process's rows, or every rank's rows of process_group."""
        group = self.process_group
        if not self._distributed():
            return x.mean(dim=0), x.detach().var(dim=0, unbiased=False)
        rows = torch.tensor([float(x.shape[0])], dtype=x.dtype, device=x.device)
        torch.distributed.all_reduce(rows, group=group)
        mean = _SumOverRanks.apply(x.sum(dim=0), group) / rows
        squares = ((x.detach() - mean.detach()) ** 2).sum(dim=0)
        torch.distributed.all_reduce(squares, group=group)
        return mean, squares / rows

    def _distributed(self) -> bool:
        group = self.process_group
        return group is not None and torch.distributed.get_world_size(group) > 1

    def _mixture_over_ranks(self, stats: Sequence) -> bool:
        """A mixture's statistics under data parallelism: `_mixture_terms_over_ranks` computes them."""
        return self._distributed() and any(getattr(s, "routing", None) is not None for s in stats)

    def _mixture_terms_over_ranks(self, stats: Sequence, epoch: float) -> dict:
        """integrator_terms and the router balance over every rank's rows when a mixture's experts
        get different rows on different ranks. Every rank builds the same list of integrators
        (each block's, every expert of a mixture: the model's structure, not its routing), with zero
        rows where an expert got none here, so every rank issues the same collectives and computes
        the same loss; every mean is over all ranks' rows (sums through a differentiable all-reduce),
        so W ranks give the loss and gradients of one process with all their rows. J counts the
        integrators that got rows on some rank, as one process counts those that got rows."""
        group = self.process_group
        layers: dict = {}
        for s in stats:
            layers.setdefault(s.layer, []).append(s)
        entries = []  # (x [n, d], mu [d], distance [n, T], energy [n, T]) in the same order on every rank
        routings = []
        for layer in sorted(layers):
            found = layers[layer]
            routing = found[0].routing
            if routing is None:
                entries += [(_wide(s.x), _wide(s.mu), _wide(s.distance), _wide(s.energy)) for s in found]
                continue
            routings.append(routing)
            by_expert = {s.expert: s for s in found}
            template = found[0]
            for e in range(routing.mus.shape[0]):
                s = by_expert.get(e)
                if s is None:
                    x, dist, energy = (_wide(t)[:0] for t in (template.x, template.distance, template.energy))
                    entries.append((x, _wide(routing.mus[e]), dist, energy))
                else:
                    entries.append((_wide(s.x), _wide(s.mu), _wide(s.distance), _wide(s.energy)))
        x0 = entries[0][0]
        rows = torch.tensor([float(x.shape[0]) for x, *_ in entries], dtype=x0.dtype, device=x0.device)
        torch.distributed.all_reduce(rows, group=group)
        widths = [x.shape[1] for x, *_ in entries]
        steps = [dist.shape[1] for _, _, dist, _ in entries]
        means = _SumOverRanks.apply(torch.cat([x.sum(0) for x, *_ in entries]), group).split(widths)
        means = [m / n.clamp(min=1) for m, n in zip(means, rows)]
        squares = torch.cat([((x.detach() - m.detach()) ** 2).sum(0) for (x, *_), m in zip(entries, means)])
        torch.distributed.all_reduce(squares, group=group)
        variances = [q / n.clamp(min=1) for q, n in zip(squares.split(widths), rows)]
        distances = _SumOverRanks.apply(torch.cat([dist.sum(0) for _, _, dist, _ in entries]), group).split(steps)
        energies = _SumOverRanks.apply(torch.stack([energy.sum() for *_, energy in entries]), group)
        mean_terms, speed_terms, energy_terms = [], [], []
        for i, (x, mu, dist, energy) in enumerate(entries):
            if rows[i] == 0:  # no rank routed a row to it: not one of the J integrators
                continue
            w = 1.0 / (1.0 + variances[i]) if self.variance_weighted else torch.ones_like(means[i])
            mean_terms.append((w * (means[i] - mu) ** 2).sum())
            decay = torch.exp(-torch.arange(steps[i], device=dist.device, dtype=dist.dtype) / self.tau)
            speed_terms.append((decay * distances[i] / rows[i]).sum())
            energy_terms.append(energies[i] / (rows[i] * max(energy.shape[1], 1)))
        J = len(mean_terms)
        terms = {
            "L_mean": self.lambda_mean(epoch) * torch.stack(mean_terms).sum() / J,
            "L_speed": self.lambda_speed * torch.stack(speed_terms).sum() / J,
            "L_energy": self.current_lambda_energy() * torch.stack(energy_terms).sum() / J,
        }
        if routings:  # the Switch balance E·Σ_e f_e·P_e of every rank's rows, averaged over the mixture layers
            counts = torch.stack([torch.cat((r.counts, r.counts.new_tensor([float(r.rows)]))) for r in routings])
            torch.distributed.all_reduce(counts, group=group)
            prob_sums = _SumOverRanks.apply(torch.stack([r.prob_sums for r in routings]), group)
            balances = []
            for r, c, p in zip(routings, counts, prob_sums):
                E, n = r.counts.shape[0], c[-1].clamp(min=1)
                balances.append(E * ((c[:-1] / (n * r.top_k)) * (p / n)).sum())
            terms["_balance"] = torch.stack(balances).mean()
        return terms

    def integrator_terms(self, stats: Sequence, epoch: float = 0) -> dict:
        """L_mean, L_speed, L_energy from a list of IntegratorStats (or anything with x, mu,
        energy, distance)."""
        if not stats:
            raise ValueError("IntegratorLoss needs the integrators' statistics: call the model with return_aux=True")
        if self._mixture_over_ranks(stats):
            terms = self._mixture_terms_over_ranks(stats, epoch)
            terms.pop("_balance", None)
            return terms
        mean_terms, speed_terms, energy_terms = [], [], []
        for s in stats:
            x = _wide(s.x)
            mean, var = self._batch_mean_var(x)
            w = 1.0 / (1.0 + var) if self.variance_weighted else torch.ones_like(mean)
            mean_terms.append((w * (mean - _wide(s.mu)) ** 2).sum())
            distance = _wide(s.distance)
            decay = torch.exp(-torch.arange(distance.shape[1], device=distance.device, dtype=distance.dtype) / self.tau)
            speed_terms.append((decay * distance.mean(dim=0)).sum())
            energy_terms.append(_wide(s.energy).mean())
        J = len(stats)
        return {
            "L_mean": self.lambda_mean(epoch) * torch.stack(mean_terms).sum() / J,
            "L_speed": self.lambda_speed * torch.stack(speed_terms).sum() / J,
            "L_energy": self.current_lambda_energy() * torch.stack(energy_terms).sum() / J,
        }

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, aux: dict, epoch: float = 0) -> dict:
        """logits [..., V], targets [...], aux the model's aux dict -> the terms and "total"."""
        task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=self.ignore_index)
        stats = aux["integrators"]
        balance = aux.get("router_balance")
        if self._mixture_over_ranks(stats):
            # a mixture under data parallelism: its experts' rows differ by rank (see the method)
            integrator = self._mixture_terms_over_ranks(stats, epoch)
            balance = integrator.pop("_balance", balance)
        else:
            integrator = self.integrator_terms(stats, epoch)
        terms = {"L_task": task, **integrator}
        if balance is not None:
            terms["L_balance"] = self.lambda_balance * balance
        terms["total"] = sum(terms.values())
        return terms

