"""The original INL-LLM package's `inl_llm.optimizations` names, served by this project's ops.

Level 1: LowRankEmbedding, AdaptiveIntegratorNeuronLayer, AdaptiveHierarchicalINL,
GradientCheckpointedINL, compute_parameter_reduction, print_optimization_summary.
Level 2: SharedController, SparseHarmonicINL, HierarchicalEquilibriumINL, MixtureOfIntegrators,
compute_advanced_optimization_gains.
"""
from .advanced_optimizations import (HierarchicalEquilibriumINL, MixtureOfIntegrators, SharedController,
                                     SparseHarmonicINL, compute_advanced_optimization_gains)
from .optimizations import (AdaptiveHierarchicalINL, AdaptiveIntegratorNeuronLayer, GradientCheckpointedINL,
                            LowRankEmbedding, compute_parameter_reduction, print_optimization_summary)

__all__ = [
    "LowRankEmbedding", "AdaptiveIntegratorNeuronLayer", "AdaptiveHierarchicalINL", "GradientCheckpointedINL",
    "compute_parameter_reduction", "print_optimization_summary",
    "SharedController", "SparseHarmonicINL", "HierarchicalEquilibriumINL", "MixtureOfIntegrators",
    "compute_advanced_optimization_gains",
]
