"""Drop-in nn.Modules: they hold parameters and call the functional ops, nothing more.

Every module takes `backend`: "auto", or a backend name, which then runs the ops it has kernels
for while "auto" picks the rest (a module built with backend="cpu" runs the C++ iterate and
RMSNorm and the best available attention, swiglu and embedding)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import functional as F_inl
from ._dispatch import preferred
from .reference.rope import rope_tables


class Controller(nn.Module):
    """The controller MLP of SPEC §2, shareable by every IntegratorLayer of a model:
    c = relu(h·w_hᵀ + b_h + x·w_xᵀ + b_x + v·w_vᵀ + b_v), (a, b, g, u) = split(c·w_oᵀ + b_o, 4).

    The output bias starts where the seeds start the dynamics (alpha = init_alpha,
    beta = init_beta, gate = init_gate, v_cand = 0 under identity modulation), and the output
    weight is small so the context only nudges those values at initialisation."""

    def __init__(self, d: int, hidden: int = 64, init_alpha: float = 0.8, init_beta: float = 0.5,
                 init_gate: float = 0.5, out_std: float = 0.02):
        super().__init__()
        self.d, self.hidden = d, hidden
        self.h_proj = nn.Linear(d, hidden)
        self.x_proj = nn.Linear(d, hidden)
        self.v_proj = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, 4 * d)
        self.init_values = (init_alpha, init_beta, init_gate)
        self.out_std = out_std
        self.reset_output()

    @torch.no_grad()
    def reset_output(self):
        init_alpha, init_beta, init_gate = self.init_values
        nn.init.normal_(self.out.weight, std=self.out_std)
        d = self.d
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        self.out.bias[:d] = logit(init_alpha)
        self.out.bias[d:2 * d] = math.log(math.expm1(init_beta))  # softplus⁻¹
        self.out.bias[2 * d:3 * d] = logit(init_gate)
        self.out.bias[3 * d:] = 0.0

    def weights(self) -> dict:
        """The controller's tensors under the keyword names of `inl_iterate`."""
        return dict(w_h=self.h_proj.weight, b_h=self.h_proj.bias, w_x=self.x_proj.weight,
                    b_x=self.x_proj.bias, w_v=self.v_proj.weight, b_v=self.v_proj.bias,
                    w_o=self.out.weight, b_o=self.out.bias)


def spread_indices(d: int, count: int) -> torch.Tensor:
    """`count` distinct dims spread evenly over [0, d), sorted: the deterministic choice of
    excited dims (no randomness anywhere in the dynamics)."""
    count = max(0, min(count, d))
    return (torch.arange(count, dtype=torch.int64) * d) // max(count, 1)


class IntegratorLayer(nn.Module):
    """One layer's integrator: per-layer modulation of a shared Controller, hierarchical
    equilibrium mu = mu_global + group offsets (groups of `mu_group_size` dims; None gives
    one mu per dim), sparse harmonic excitation on a fixed, evenly spread `excitation_sparsity`
    fraction of dims, dynamic alpha (`kappa`; None switches it off), and early exit at
    inference (`tol`, `min_iterations`; never while training).

    With `mu_ema_rate`, mu also follows the batch mean of h: mu ← (1−η)·mu + η·mean(h), written
    into the global value and the group offsets. The update is deferred: a training forward
    records mean(h), and the layer applies it at the start of its next forward (or when
    `apply_mu_ema()` is called, e.g. before a checkpoint is saved), so a forward, its backward
    and a gradient-checkpointing recomputation of it all see the same mu. A recomputation (a
    forward run during a backward pass) neither applies nor records an update.

    A recorded target keeps its row count (`_mu_rows`, 0 once combined) so that a caller running
    one layer in several processes can replace it with the mean over all their rows before it is
    applied: IntegratorLanguageModel does so after each training forward under torch.distributed,
    which keeps the replicas' mu one (applying stays local, never a collective)."""

    def __init__(self, d: int, controller: Controller, num_iterations: int = 5, dt: float = 0.1,
                 kappa: Optional[float] = 1.0, excitation_sparsity: float = 0.1,
                 excitation_amplitude: float = 0.03, mu_group_size: Optional[int] = 64,
                 mu_init: float = 0.0, learnable_mu: bool = True, mu_ema_rate: Optional[float] = None,
                 tol: Optional[float] = None, min_iterations: int = 3, backend: str = "auto"):
        super().__init__()
        if controller.d != d:
            raise ValueError(f"controller was built for d={controller.d}, this layer has d={d}")
        self.d = d
        self.controller = controller
        self.num_iterations = num_iterations
        self.dt, self.kappa = dt, kappa
        self.excitation_amplitude = excitation_amplitude
        self.tol, self.min_iterations = tol, min_iterations
        self.mu_ema_rate = mu_ema_rate
        self.backend = backend
        self.mod_scale = nn.Parameter(torch.ones(4))
        self.mod_bias = nn.Parameter(torch.zeros(4))

        self.mu_group_size = mu_group_size
        groups = math.ceil(d / mu_group_size) if mu_group_size else d
        mu_global = torch.tensor(float(mu_init)) if mu_group_size else torch.zeros(())
        mu_local = torch.zeros(groups) if mu_group_size else torch.full((d,), float(mu_init))
        if learnable_mu:
            self.mu_global = nn.Parameter(mu_global)
            self.mu_local = nn.Parameter(mu_local)
        else:
            self.register_buffer("mu_global", mu_global)
            self.register_buffer("mu_local", mu_local)

        count = round(d * excitation_sparsity) if excitation_sparsity > 0 else 0
        if excitation_sparsity > 0:
            count = max(1, count)
        self.register_buffer("exc_index", spread_indices(d, count))
        k = torch.arange(count, dtype=torch.float32)
        self.gamma = nn.Parameter(0.5 + k / max(count, 1))  # frequencies in [0.5, 1.5)
        self.phi = nn.Parameter(2 * math.pi * k / max(count, 1))  # phases spread over the circle
        self._mu_target: Optional[torch.Tensor] = None  # mean(h) of the last training forward, pending
        self._mu_rows = 0  # rows behind _mu_target while it is this process's own (not yet combined)

    def equilibrium(self) -> torch.Tensor:
        """mu expanded to [d]."""
        if self.mu_group_size:
            offsets = self.mu_local.repeat_interleave(self.mu_group_size)[: self.d]
            return self.mu_global + offsets
        return self.mu_global + self.mu_local

    @torch.no_grad()
    def apply_mu_ema(self):
        """mu ← (1−η)·mu + η·target with η = mu_ema_rate, toward the target the last training
        forward recorded; a no-op when none is pending."""
        target, self._mu_target, self._mu_rows = self._mu_target, None, 0
        if target is None or not self.mu_ema_rate:
            return
        rate = self.mu_ema_rate
        new_mu = (1 - rate) * self.equilibrium().float() + rate * target
        if self.mu_group_size:
            # the closest hierarchical mu (least squares) takes each group's mean; the global
            # value holds the mean of the group means, the offsets the rest
            group = torch.arange(self.d, device=target.device) // self.mu_group_size
            sums = torch.zeros_like(self.mu_local, dtype=torch.float32).index_add_(0, group, new_mu)
            group_mean = sums / torch.bincount(group, minlength=sums.numel())
            new_global = group_mean.mean()
            self.mu_global.copy_(new_global)
            self.mu_local.copy_(group_mean - new_global)
        else:
            self.mu_local.copy_(new_mu - self.mu_global)

    def forward(self, h: torch.Tensor, x: torch.Tensor, v: Optional[torch.Tensor] = None,
                return_info: bool = False, num_iterations: Optional[int] = None, return_trajectory: bool = False):
        """h, x (and v): [..., d]. Returns x_T, or (x_T, IterateInfo) with return_info (implied by
        return_trajectory, which adds the iterate's x and v trajectories, [rows, T+1, d])."""
        # a forward inside a backward pass is a checkpoint recomputation: it must see the mu the
        # original forward saw (the test used by torch's own module tracker; only asked when the
        # EMA is on, so a compiled forward without it has nothing to break its graph)
        recomputing = bool(self.mu_ema_rate) and torch._C._current_graph_task_id() != -1
        if not recomputing:
            self.apply_mu_ema()
        for name, t in (("h", h), ("x", x), ("v", v)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[-1] != self.d):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have the layer's width d={self.d} as its last dimension, got {got}")
        if x.shape != h.shape or (v is not None and v.shape != x.shape):
            raise ValueError(f"h, x (and v) must have one shape, got h {list(h.shape)}, x {list(x.shape)}"
                             + ("" if v is None else f", v {list(v.shape)}"))
        shape = x.shape
        # the op wants contiguous rows; a layer accepts any layout (a no-op when already so)
        h2, x2 = h.reshape(-1, self.d).contiguous(), x.reshape(-1, self.d).contiguous()
        v2 = None if v is None else v.reshape(-1, self.d).contiguous()
        out = F_inl.inl_iterate(
            h2, x2, **self.controller.weights(), mod_scale=self.mod_scale, mod_bias=self.mod_bias,
            mu=self.equilibrium(), exc_index=self.exc_index, gamma=self.gamma, phi=self.phi,
            amplitude=self.excitation_amplitude, dt=self.dt, kappa=self.kappa,
            num_iterations=num_iterations or self.num_iterations, v=v2,
            tol=None if self.training else self.tol, min_iterations=self.min_iterations,
            backend=preferred(self.backend, "iterate"), return_info=return_info,
            return_trajectory=return_trajectory)
        if self.training and self.mu_ema_rate and not recomputing and h2.shape[0] > 0:
            self._mu_target = h2.detach().float().mean(0)
            self._mu_rows = h2.shape[0]
        if return_info or return_trajectory:
            x_out, info = out
            return x_out.view(shape), info
        return out.view(shape)


class RMSNorm(nn.Module):
    """rms_norm over the last dim with a learned weight; forward(x, residual=None)."""

    def __init__(self, d: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, residual=None):
        return F_inl.rms_norm(x, self.weight, self.eps, residual, backend=preferred(self.backend, "rms_norm"))


class Linear(nn.Linear):
    """nn.Linear whose forward runs `inl_kernels.linear` on the module's `backend`: the same
    parameters, initialisation, state_dict keys and autograd, and an instance of nn.Linear for
    what tests with isinstance (PEFT's LoRA, torchao's quantize_ filter, FSDP wrap policies).
    What matches the exact type does not see it: `torch.ao.quantization.quantize_dynamic(model,
    {nn.Linear})` leaves it alone (name `{nn.Linear, inl_kernels.Linear}` there). Only few-row
    inference on a CPU runs differently: the decode kernel of inl_kernels/cpu/linear.py, in the
    last bits of F.linear's result."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input):  # noqa: A002 - nn.Linear's name, for callers that pass it by keyword
        return F_inl.linear(input, self.weight, self.bias, backend=preferred(self.backend, "linear"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class GQAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE applied inside the attention op.

    forward(x [B, S, d], past_key_value=None, use_cache=False, kv_starts=None) -> (out [B, S, d],
    present). Keys are cached *unrotated* (the op rotates keys at their positions as it reads them).

    past_key_value may be
    - a (k, v) pair [B, Hkv, S_past, D]: the new keys are appended (a new tensor per call) and
      present = (k, v) of all positions when use_cache;
    - a static cache: an object whose `update(k, v)` writes the new keys and values into
      preallocated buffers and returns (k_buffer, v_buffer, kv_lens, kv_starts) for the op (see
      inl_llm.cache); it is returned as `present`, and decoding never reallocates.
    kv_starts [B] (without a static cache): each row's left padding (gqa_attention's kv_starts)."""

    def __init__(self, d: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope_base: float = 10000.0, max_seq_len: int = 2048,
                 backend: str = "auto"):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or d // num_heads
        self.backend = backend
        D = self.head_dim
        self.q_proj = Linear(d, num_heads * D, bias=False, backend=backend)
        self.k_proj = Linear(d, num_kv_heads * D, bias=False, backend=backend)
        self.v_proj = Linear(d, num_kv_heads * D, bias=False, backend=backend)
        self.o_proj = Linear(num_heads * D, d, bias=False, backend=backend)
        self.rope_base, self.max_seq_len = rope_base, max_seq_len
        cos, sin = rope_tables(max_seq_len, D, rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the RoPE tables stay fp32 when the module is cast to fp16/bf16: in 8 mantissa bits
        # cos/sin of large positions are wrong in the second digit. fp64 casts are kept (gradcheck).
        if self.cos.dtype in (torch.float16, torch.bfloat16):
            self.cos, self.sin = rope_tables(self.max_seq_len, self.head_dim, self.rope_base, device=self.cos.device)
        return self

    def forward(self, x, past_key_value=None, use_cache=False, kv_starts=None):
        B, S, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, S, self.num_heads, D).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, D).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, D).transpose(1, 2)
        present, kv_lens = None, None
        if hasattr(past_key_value, "update"):
            k, v, kv_lens, kv_starts = past_key_value.update(k, v)
            present = past_key_value
        elif past_key_value is not None:
            k = torch.cat((past_key_value[0], k), dim=2)
            v = torch.cat((past_key_value[1], v), dim=2)
        if use_cache and present is None:
            present = (k, v)
        out = F_inl.gqa_attention(q, k, v, causal=True, rope=(self.cos, self.sin),
                                  backend=preferred(self.backend, "attention"), kv_lens=kv_lens, kv_starts=kv_starts)
        out = self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * D))
        return out, (present if use_cache else None)


class SwiGLU(nn.Module):
    """(silu(x·w_gateᵀ) · (x·w_upᵀ))·w_downᵀ, no biases."""

    def __init__(self, d: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return F_inl.swiglu(x, self.gate.weight, self.up.weight, self.down.weight,
                            backend=preferred(self.backend, "swiglu"))


class LowRankEmbedding(nn.Module):
    """Token embedding factorised as embed_low [V, r] · project_upᵀ [r, d]."""

    def __init__(self, vocab_size: int, d: int, rank: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.embed_low = nn.Parameter(torch.empty(vocab_size, rank))
        self.project_up = nn.Parameter(torch.empty(d, rank))
        nn.init.normal_(self.embed_low, std=1.0)
        nn.init.normal_(self.project_up, std=1.0 / math.sqrt(rank))

    def forward(self, ids):
        return F_inl.low_rank_embedding(ids, self.embed_low, self.project_up,
                                        backend=preferred(self.backend, "embedding"))
