"""The original INL-LLM package's `inl_llm.models` names, served by this project's model:
UltraOptimizedIntegratorLanguageModel (also IntegratorLanguageModel), create_ultra_optimized_model
(also create_model), OptimizedIntegratorLanguageModel, create_optimized_model. They take the
original's keyword arguments and return its shapes; `inl_llm.create_model` /
`inl_llm.IntegratorLanguageModel` (the v3 API: INLConfig, three return values) are unchanged."""
from .integrator_language_model import (ULTRA_SIZES, CompatLanguageModel, IntegratorLanguageModel,
                                        UltraOptimizedIntegratorLanguageModel, create_model,
                                        create_ultra_optimized_model)
from .integrator_language_model_optimized import (OPTIMIZED_SIZES, OptimizedIntegratorLanguageModel,
                                                  create_optimized_model)

__all__ = ["UltraOptimizedIntegratorLanguageModel", "IntegratorLanguageModel", "create_ultra_optimized_model",
           "create_model", "OptimizedIntegratorLanguageModel", "create_optimized_model", "ULTRA_SIZES",
           "OPTIMIZED_SIZES", "CompatLanguageModel"]
