"""The original package's Level-1 model: `OptimizedIntegratorLanguageModel` and
`create_optimized_model`, served by our model with the Level-2 features off (a controller per
layer, one mu per dim, excitation on every dim)."""
from __future__ import annotations

from typing import Optional

from ..config import INLConfig
from .integrator_language_model import CompatLanguageModel


class OptimizedIntegratorLanguageModel(CompatLanguageModel):
    """The original's keyword constructor and defaults; num_kv_heads and INLConfig fields by
    keyword as for UltraOptimizedIntegratorLanguageModel. tie_weights ties the LM head to the
    embedding when it is a full one (as the original: never with low-rank embeddings)."""

    def __init__(self, vocab_size: int, d_model: int = 512, num_layers: int = 6, num_heads: int = 8,
                 num_iterations_per_layer: int = 5, feedforward_dim: Optional[int] = None, max_seq_len: int = 2048,
                 dropout: float = 0.1, tie_weights: bool = True, use_attention: bool = True,
                 use_lowrank_embeddings: bool = True, lowrank_ratio: float = 0.125,
                 use_gradient_checkpointing: bool = False, use_adaptive_stopping: bool = True,
                 convergence_threshold: float = 0.01, num_kv_heads: Optional[int] = None, **config):
        if not use_attention:
            raise ValueError("use_attention=False (a context projection instead of attention) is not supported: "
                             "every block of this model attends")
        super().__init__(INLConfig(
            vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=num_kv_heads or num_heads, feedforward_dim=feedforward_dim or 4 * d_model,
            max_seq_len=max_seq_len, num_iterations=num_iterations_per_layer, dropout=dropout,
            tie_embeddings=tie_weights and not use_lowrank_embeddings, low_rank_embeddings=use_lowrank_embeddings,
            embedding_rank_ratio=lowrank_ratio, gradient_checkpointing=use_gradient_checkpointing,
            adaptive_stopping=use_adaptive_stopping, tol=convergence_threshold,
            min_iterations=min(2, num_iterations_per_layer), shared_controller=False, hierarchical_mu=False,
            sparse_excitation=False, **config), seeded="seed" in config)

    def get_inference_stats(self) -> dict:
        """{'layer_{i}_avg_iterations': running average of the steps layer i ran} with adaptive
        stopping on (the original's form), else {}."""
        if not self.config.adaptive_stopping:
            return {}
        return {f"layer_{i}_avg_iterations": float(a) for i, a in enumerate(self._avg_iterations.tolist())}


# the original's sizes: d_model, layers, heads, iterations per layer, FF width
OPTIMIZED_SIZES = {
    "small": (512, 6, 8, 5, 2048), "medium": (768, 12, 8, 7, 3072), "large": (1024, 24, 16, 10, 4096),
    "xlarge": (1536, 32, 24, 12, 6144), "2B": (2048, 40, 32, 15, 8192), "5B": (4096, 32, 32, 10, 16384),
    "10B": (5120, 40, 40, 12, 20480),
}


def create_optimized_model(size: str = "small", vocab_size: int = 50000, enable_all_optimizations: bool = True,
                           **config) -> OptimizedIntegratorLanguageModel:
    """The original's named sizes (OPTIMIZED_SIZES); enable_all_optimizations switches low-rank
    embeddings, gradient checkpointing and adaptive stopping together."""
    if size not in OPTIMIZED_SIZES:
        raise ValueError(f"size must be one of {list(OPTIMIZED_SIZES)}, got {size!r}")
    d, layers, heads, iterations, ff = OPTIMIZED_SIZES[size]
    on = enable_all_optimizations
    return OptimizedIntegratorLanguageModel(
        vocab_size=vocab_size, d_model=d, num_layers=layers, num_heads=heads, num_iterations_per_layer=iterations,
        feedforward_dim=ff, max_seq_len=2048, use_lowrank_embeddings=on, use_gradient_checkpointing=on,
        use_adaptive_stopping=on, **config)
