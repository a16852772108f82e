"""The model configuration: one dataclass, the named sizes of the seeds, and a switch for every
feature the seeds list (SPEC §4).

Named sizes (d_model × layers, heads / kv heads, iterations per layer, FF dim, context):

    tiny     128 ×  4,  4 /  2,  4,   384,  256   this project's CPU size (tests, demo; controller
                                                  hidden 32 instead of 64)
    small    512 ×  6,  8 /  2,  5,  2048,  512   seeds
    medium   768 × 12, 12 /  3,  7,  3072, 1024   seeds
    large   1024 × 24, 16 /  4, 10,  4096, 2048   seeds
    xlarge  1536 × 32, 12 /  3, 12,  6144, 4096   seeds (heads: ours)
    3B      2048 × 40, 16 /  4, 15,  8192, 4096   seeds (heads: ours)
    7B      4096 × 32, 32 /  8, 15, 11008, 4096   seeds give d × layers only
    13B     5120 × 40, 40 / 10, 15, 13824, 4096   seeds give d × layers only
    30B     6656 × 60, 52 / 13, 15, 17920, 4096   not in the seeds
    70B     8192 × 80, 64 /  8, 15, 28672, 4096   not in the seeds

Where the seeds are silent we took standard values: heads of 64 dims up to `large` (the seeds
fix 8 / 12 / 16) and 128 dims above it; 4 query heads per K/V head (the GQA ratio of the v3
seed's example), except 8 K/V heads at 70B; from 7B up, the FF width and (30B, 70B) the depth and
width of the LLaMA models of the same size (SwiGLU at ≈ 8/3·d); 15 iterations per layer (the
largest count the seeds name) above 3B.

Feature switches, and their defaults as the seeds set them:
- low_rank_embeddings (on): embedding factorised at rank max(min_embedding_rank, ratio·d),
  ratio 0.125, rank ≥ 64.
- shared_controller (on): one controller MLP for the whole model, per-layer modulation
  (mod_scale, mod_bias) in every layer; off gives each layer its own controller.
- hierarchical_mu (on): mu = mu_global + one offset per group of 64 dims; off: one mu per dim.
- sparse_excitation (on): harmonic excitation on 10 % of the dims; off excites every dim.
  excitation_amplitude = 0 switches excitation off altogether.
- dynamic_alpha (on): alpha scaled by 1 − exp(−kappa·rms(x − mu)), kappa = 1.
- adaptive_stopping (on): early exit at inference once ‖x' − x‖₂ < tol after min_iterations
  steps (never while training).
- iteration_budgets (on): per-layer budgets from the iterations each layer used at inference
  (see `IterationBudget` in model.py).
- gradient_checkpointing (off; the seeds: "enable for large models", so on from xlarge up).
- learnable_mu (on) and mu_ema_rate (None: off; the seeds' EMA rate is 1e-4).
- mixture_of_integrators (off; a research feature in the seeds): num_experts integrators per
  block, a router picks top_k of them per token.
- dropout (0.0: off): dropout on the embedding and on each residual branch (attention,
  integrator, FFN outputs) while training; it holds no parameters.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

from .data import ByteTokenizer

from inl_kernels import BACKENDS

BACKEND_CHOICES = ("auto",) + BACKENDS


@dataclass
class INLConfig:
    vocab_size: int = ByteTokenizer.vocab_size
    d_model: int = 512
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    feedforward_dim: int = 2048
    max_seq_len: int = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    # the integrator
    num_iterations: int = 5
    controller_hidden: int = 64
    dt: float = 0.1
    init_alpha: float = 0.8
    init_beta: float = 0.5
    init_gate: float = 0.5

    # feature switches (module docstring)
    low_rank_embeddings: bool = True
    embedding_rank_ratio: float = 0.125
    min_embedding_rank: int = 64
    shared_controller: bool = True
    hierarchical_mu: bool = True
    mu_group_size: int = 64
    sparse_excitation: bool = True
    excitation_sparsity: float = 0.1
    excitation_amplitude: float = 0.03
    dynamic_alpha: bool = True
    alpha_kappa: float = 1.0
    adaptive_stopping: bool = True
    tol: float = 0.01
    min_iterations: int = 3
    iteration_budgets: bool = True
    budget_slack: int = 1
    budget_momentum: float = 0.5
    gradient_checkpointing: bool = False
    learnable_mu: bool = True
    mu_init: float = 0.0
    mu_ema_rate: Optional[float] = None
    mixture_of_integrators: bool = False
    num_experts: int = 8
    top_k: int = 2
    dropout: float = 0.0

    seed: int = 0  # parameters are a function of this seed alone
    backend: str = "auto"  # every op of the model goes through this backend choice

    def __post_init__(self):
        """Every field is checked once, here: a wrong type raises TypeError, a value outside its
        domain ValueError, each naming the field (a bad dt would otherwise surface only as NaN
        logits, and a config that cannot be built could never be loaded back)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _FIELD_KINDS[f.name]
            if kind is bool and not isinstance(value, bool):
                raise TypeError(f"{f.name} must be a bool, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{f.name} must be an int, got {value!r}")
            if kind is float and not (value is None and f.name in _OPTIONAL) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{f.name} must be a number, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise TypeError(f"{f.name} must be a str, got {value!r}")
            if kind is float and value is not None and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "feedforward_dim",
                     "max_seq_len", "num_iterations", "controller_hidden", "min_embedding_rank",
                     "mu_group_size", "num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name, (low, high, low_open, high_open) in _FLOAT_DOMAINS.items():
            value = getattr(self, name)
            if value is None:
                continue
            below = value <= low if low_open else value < low
            above = high is not None and (value >= high if high_open else value > high)
            if below or above:
                interval = (("(" if low_open else "[") + f"{low}, " + (f"{high}" if high is not None else "inf")
                            + (")" if high_open or high is None else "]"))
                raise ValueError(f"{name} must lie in {interval}, got {value!r}")
        for name in ("budget_slack", "min_iterations"):  # min_iterations 0 behaves as 1
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"the head dim d_model/num_heads = {self.d_model // self.num_heads} must be even "
                             f"(rotate-half RoPE)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.min_iterations > self.num_iterations:
            raise ValueError(f"min_iterations ({self.min_iterations}) must be <= num_iterations "
                             f"({self.num_iterations})")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def embedding_rank(self) -> int:
        return max(self.min_embedding_rank, round(self.d_model * self.embedding_rank_ratio))

    @classmethod
    def from_name(cls, size: str, **overrides) -> "INLConfig":
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; the named sizes are {', '.join(SIZES)}")
        return cls(**{**SIZES[size], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "INLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown} (written by a newer inl_llm?)")
        return cls(**values)


_OPTIONAL = {"mu_ema_rate"}
# each field's kind (the dataclass annotations are strings under `from __future__ import annotations`)
_FIELD_KINDS = {f.name: {"int": int, "float": float, "bool": bool, "str": str, "Optional[float]": float}[f.type]
                for f in dataclasses.fields(INLConfig)}
# float fields: (low, high or None, low excluded, high excluded). Why each bound: rope_base is
# raised to fractional powers; norm_eps sits under a square root beside mean(x²) (0 is allowed);
# dt scales every step (0 freezes the state, < 0 runs it backwards); init_alpha and init_gate pass
# through a logit and init_beta through softplus⁻¹; kappa 0 would make alpha 0 (dynamic_alpha is
# the switch for that); a negative amplitude is the same excitation with phase + π; tol is a
# norm; the EMA rates and the excited fraction are proportions.
_FLOAT_DOMAINS = {
    "rope_base": (0.0, None, True, False),
    "norm_eps": (0.0, None, False, False),
    "dt": (0.0, None, True, False),
    "init_alpha": (0.0, 1.0, True, True),
    "init_beta": (0.0, None, True, False),
    "init_gate": (0.0, 1.0, True, True),
    "embedding_rank_ratio": (0.0, None, True, False),
    "excitation_sparsity": (0.0, 1.0, False, False),
    "excitation_amplitude": (0.0, None, False, False),
    "alpha_kappa": (0.0, None, True, False),
    "tol": (0.0, None, False, False),
    "budget_momentum": (0.0, 1.0, False, False),
    "mu_ema_rate": (0.0, 1.0, True, False),
    "dropout": (0.0, 1.0, False, True),
}


def _size(d, layers, heads, kv_heads, iterations, ff, ctx, **extra):
    return dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, num_iterations=iterations,
                feedforward_dim=ff, max_seq_len=ctx, **extra)


SIZES = {
    "tiny": _size(128, 4, 4, 2, 4, 384, 256, controller_hidden=32),
    "small": _size(512, 6, 8, 2, 5, 2048, 512),
    "medium": _size(768, 12, 12, 3, 7, 3072, 1024),
    "large": _size(1024, 24, 16, 4, 10, 4096, 2048),
    "xlarge": _size(1536, 32, 12, 3, 12, 6144, 4096, gradient_checkpointing=True),
    "3B": _size(2048, 40, 16, 4, 15, 8192, 4096, gradient_checkpointing=True),
    "7B": _size(4096, 32, 32, 8, 15, 11008, 4096, gradient_checkpointing=True),
    "13B": _size(5120, 40, 40, 10, 15, 13824, 4096, gradient_checkpointing=True),
    "30B": _size(6656, 60, 52, 13, 15, 17920, 4096, gradient_checkpointing=True),
    "70B": _size(8192, 80, 64, 8, 15, 28672, 4096, gradient_checkpointing=True),
}

# fields that change how a model runs but not its parameters: a checkpoint loads under any value
RUNTIME_FIELDS = frozenset({"tol", "min_iterations", "adaptive_stopping", "gradient_checkpointing", "backend",
                            "seed", "iteration_budgets", "budget_slack", "budget_momentum", "mu_ema_rate",
                            "excitation_amplitude", "dropout"})

