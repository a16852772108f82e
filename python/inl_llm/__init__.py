"""INL-LLM: the thin model layer on top of inl_kernels (SPEC §4)."""
from .config import INLConfig, SIZES
from .model import IntegratorLanguageModel, build_model, create_model

__all__ = ["INLConfig", "SIZES", "IntegratorLanguageModel", "create_model", "build_model"]
