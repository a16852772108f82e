"""The original package's module path for the Level-1+2 model (see integrator_language_model)."""
from .integrator_language_model import (ULTRA_SIZES, UltraOptimizedIntegratorLanguageModel,  # noqa: F401
                                        create_ultra_optimized_model)
