"""The original package's Level-1 optimizations (`inl_llm.optimizations.optimizations`), served by
our modules: the low-rank embedding, the adaptive early-stopping wrappers and the
gradient-checkpointing wrapper of an integrator layer, and the parameter-count reports.

Early stopping is the iterate's own (SPEC §2): a row stops once ‖x' − x‖₂ < threshold after
at least min_iterations steps, checked after every step, never while a gradient is needed.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from inl_kernels import LowRankEmbedding as _LowRankEmbedding

from ..model import Float32Buffers


def low_rank(d_model: int, rank_ratio: float) -> int:
    """The original's rank rule: max(64, int(d_model · rank_ratio))."""
    return max(64, int(d_model * rank_ratio))


class LowRankEmbedding(_LowRankEmbedding):
    """Token embedding factorised as embed_low [V, r] · project_upᵀ [r, d], built with the
    original's arguments (rank, or rank = max(64, int(d_model · rank_ratio)))."""

    def __init__(self, vocab_size: int, d_model: int, rank: Optional[int] = None, rank_ratio: float = 0.125,
                 backend: str = "auto"):
        rank = low_rank(d_model, rank_ratio) if rank is None else rank
        super().__init__(vocab_size, d_model, rank, backend=backend)
        self.vocab_size, self.d_model, self.rank = vocab_size, d_model, rank

    def num_parameters(self) -> int:
        return self.vocab_size * self.rank + self.rank * self.d_model

    def __repr__(self) -> str:
        full = self.vocab_size * self.d_model
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, d_model={self.d_model}, rank={self.rank}, "
                f"parameters={self.num_parameters():,} vs {full:,} full, "
                f"reduction={100 * (1 - self.num_parameters() / full):.1f}%)")


class _Adaptive(Float32Buffers):
    """Early-stopping wrapper of an integrator layer (anything with `iterate`, `init_state`):
    runs up to max_iterations steps in one call of the iterate and keeps `avg_iterations`, the
    running average (rate 0.01, started at the first observation) of the mean steps per row
    over eval-mode calls."""

    float32_buffers = ("avg_iterations",)  # a running average: fp32 under any cast

    def __init__(self, inl_layer: nn.Module, convergence_threshold: float, min_iterations: int, max_iterations: int,
                 check_interval: int):
        super().__init__()
        if not hasattr(inl_layer, "iterate"):
            raise TypeError(f"inl_layer must be one of inl_llm's integrator layers (with .iterate), got "
                            f"{type(inl_layer).__name__}")
        if check_interval != 1:
            raise ValueError(f"check_interval must be 1: the iterate checks every row after every step, got "
                             f"{check_interval}")
        if not 1 <= min_iterations <= max_iterations:
            raise ValueError(f"need 1 <= min_iterations <= max_iterations, got {min_iterations} and {max_iterations}")
        self.inl = inl_layer
        self.convergence_threshold = convergence_threshold
        self.min_iterations, self.max_iterations, self.check_interval = min_iterations, max_iterations, check_interval
        self.register_buffer("avg_iterations", torch.tensor(0.0, dtype=torch.float32))
        self.register_buffer("num_forwards", torch.tensor(0))

    def record(self, iterations: torch.Tensor):
        """Folds one call's steps per row into avg_iterations (eval mode only)."""
        if self.training or iterations.numel() == 0:
            return
        with torch.no_grad():
            mean = iterations.float().mean()
            first = self.num_forwards == 0
            self.avg_iterations.copy_(torch.where(first, mean, 0.99 * self.avg_iterations + 0.01 * mean))
            self.num_forwards += 1

    def reset_statistics(self):
        self.avg_iterations.zero_()
        self.num_forwards.zero_()

    def run(self, h, x, v, num_iterations, use_early_stopping, return_trajectory):
        T = self.max_iterations if num_iterations is None else num_iterations
        stop = (not self.training) if use_early_stopping is None else use_early_stopping
        x_T, info = self.inl.iterate(h, x, v, T, tol=self.convergence_threshold if stop else None,
                                     min_iterations=min(self.min_iterations, T), return_trajectory=return_trajectory)
        self.record(info.iterations)
        # counts as floats: the seeds' examples average them (`info['iterations_used'].mean()`)
        used = info.iterations.float()
        return x_T, info, used, used < T


class AdaptiveIntegratorNeuronLayer(_Adaptive):
    """forward(h, num_iterations=None, use_early_stopping=None, return_trajectory=False) ->
    (x, v, info): from the layer's init_state (x0 = mu, v0 = 0); info = {'iterations_used' [B],
    'converged' [B] (stopped before the last step), 'avg_iterations', and with
    return_trajectory 'trajectory': {'x', 'v'} [B, T+1, d]}. Early stopping defaults to eval
    mode."""

    def __init__(self, inl_layer: nn.Module, convergence_threshold: float = 0.01, min_iterations: int = 3,
                 max_iterations: int = 10, check_interval: int = 1):
        super().__init__(inl_layer, convergence_threshold, min_iterations, max_iterations, check_interval)

    def forward(self, h: torch.Tensor, num_iterations: Optional[int] = None, use_early_stopping: Optional[bool] = None,
                return_trajectory: bool = False):
        x0, v0 = self.inl.init_state(h.shape[0], h.device)
        x_T, info, used, converged = self.run(h, x0.contiguous(), v0, num_iterations, use_early_stopping,
                                              return_trajectory)
        out = {"iterations_used": used, "converged": converged, "avg_iterations": self.avg_iterations.item()}
        if return_trajectory:
            out["trajectory"] = {"x": info.trajectory_x, "v": info.trajectory_v}
        return x_T, info.v, out


class AdaptiveHierarchicalINL(_Adaptive):
    """forward(h, x, v, step=0): one step of the wrapped layer. forward_adaptive(h, initial_x,
    initial_v, num_iterations=None, use_early_stopping=None, return_trajectory=False) -> (x, v,
    result) with result = {'x', 'v', 'iterations_used', 'converged', 'avg_iterations', 'mu',
    'mu_global', 'mu_offsets', and with return_trajectory 'x_trajectory', 'v_trajectory'
    [B, T+1, d]}."""

    def __init__(self, inl_layer: nn.Module, convergence_threshold: float = 0.001, min_iterations: int = 3,
                 max_iterations: int = 12, check_interval: int = 1):
        super().__init__(inl_layer, convergence_threshold, min_iterations, max_iterations, check_interval)

    def forward(self, h, x, v, step: int = 0):
        return self.inl(h, x, v, step)

    def forward_adaptive(self, h: torch.Tensor, initial_x: torch.Tensor, initial_v: torch.Tensor,
                         num_iterations: Optional[int] = None, use_early_stopping: Optional[bool] = None,
                         return_trajectory: bool = False):
        x_T, info, used, converged = self.run(h, initial_x, initial_v, num_iterations, use_early_stopping,
                                              return_trajectory)
        result = {"x": x_T, "v": info.v, "iterations_used": used, "converged": converged,
                  "avg_iterations": self.avg_iterations.item(), "mu": self.inl.get_mu(),
                  "mu_global": getattr(self.inl, "mu_global", None),
                  "mu_offsets": getattr(self.inl, "mu_local_offsets", None)}
        if return_trajectory:
            result["x_trajectory"], result["v_trajectory"] = info.trajectory_x, info.trajectory_v
        return x_T, info.v, result


class GradientCheckpointedINL(nn.Module):
    """Recomputes the wrapped layer's forward in the backward pass instead of storing its
    activations (training only). Attributes not found here are the wrapped layer's."""

    def __init__(self, inl_layer: nn.Module):
        super().__init__()
        self.inl = inl_layer

    def forward(self, h, x, v, step: int = 0, return_aux: bool = True):
        if self.training and torch.is_grad_enabled():
            x_next, v_next = checkpoint(lambda *t: self.inl(*t, step, False)[:2], h, x, v, use_reentrant=False)
            return x_next, v_next, (self.inl.step_aux(h, x, v) if return_aux else None)
        return self.inl(h, x, v, step, return_aux)

    def iterate(self, h, x, v=None, num_iterations: int = 1, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(lambda h_, x_, v_: self.inl.iterate(h_, x_, v_, num_iterations, **kwargs), h, x, v,
                              use_reentrant=False)
        return self.inl.iterate(h, x, v, num_iterations, **kwargs)

    def init_state(self, batch_size: int, device=None):
        return self.inl.init_state(batch_size, device)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inl, name)


def compute_parameter_reduction(vocab_size: int, d_model: int, rank_ratio: float = 0.125) -> Dict[str, float]:
    """Parameters of a full embedding against the low-rank one (fp32 megabytes too)."""
    rank = low_rank(d_model, rank_ratio)
    full, low = vocab_size * d_model, vocab_size * rank + rank * d_model
    return {"standard_params": full, "lowrank_params": low, "reduction_percent": 100 * (1 - low / full),
            "rank": rank, "memory_mb_standard": full * 4 / 1e6, "memory_mb_lowrank": low * 4 / 1e6}


def print_optimization_summary(vocab_size: int, d_model: int, num_layers: int, rank_ratio: float = 0.125) -> dict:
    """Prints (and returns) the low-rank embedding's saving; early stopping and checkpointing
    are described, not estimated: their effect is measured, never assumed."""
    s = compute_parameter_reduction(vocab_size, d_model, rank_ratio)
    print(f"INL-LLM optimizations for vocab {vocab_size:,}, d_model {d_model}, {num_layers} layers")
    print(f"  low-rank embedding (rank {s['rank']}): {s['lowrank_params']:,} parameters instead of "
          f"{s['standard_params']:,} ({s['reduction_percent']:.1f}% fewer, {s['memory_mb_lowrank']:.1f} MB "
          f"instead of {s['memory_mb_standard']:.1f} MB in fp32)")
    print("  adaptive early stopping: at inference a row stops once its step ‖x' − x‖ falls below the "
          "threshold (model.get_inference_stats() reports the steps run)")
    print("  gradient checkpointing: blocks recompute their forward in the backward pass while training")
    return s
