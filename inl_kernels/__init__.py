"""INL-Kernels: fused kernels for the Integrator Neuron Language Model.

Functional ops (SPEC §2–3) with one dispatch point (`backend="auto"` picks the best backend
this machine can run for the inputs' device), the eager reference of every op, and drop-in
nn.Modules.
"""
from ._dispatch import BACKENDS, BackendUnavailableError, backends
from ._validate import set_debug
from .common import MAX_ITERATIONS, IterateInfo, IterateParams, IterateSettings, excitation_table, pin_inductor_vec_isa
from .functional import gqa_attention, inl_iterate, linear, low_rank_embedding, rms_norm, rope, swiglu
from .modules import Controller, GQAttention, IntegratorLayer, Linear, LowRankEmbedding, RMSNorm, SwiGLU
from .reference.rope import rope_tables

__version__ = "0.1.0"

__all__ = [
    "backends", "BACKENDS", "BackendUnavailableError", "set_debug", "pin_inductor_vec_isa",
    "inl_iterate", "IterateInfo", "IterateParams", "IterateSettings", "MAX_ITERATIONS",
    "rms_norm", "rope", "gqa_attention", "swiglu", "linear", "low_rank_embedding",
    "excitation_table", "rope_tables",
    "Controller", "IntegratorLayer", "RMSNorm", "GQAttention", "SwiGLU", "Linear", "LowRankEmbedding",
]
