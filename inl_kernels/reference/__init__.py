"""Eager PyTorch implementations of every op: clear, slow, and the oracle for every backend."""
from .attention import attention
from .embedding import embedding
from ..common import IterateInfo, excitation_table
from .iterate import iterate
from .linear import linear
from .rms_norm import rms_norm
from .rope import rope, rope_tables
from .swiglu import swiglu

__all__ = ["attention", "excitation_table", "embedding", "iterate", "IterateInfo",
           "linear", "rms_norm", "rope", "rope_tables", "swiglu"]
