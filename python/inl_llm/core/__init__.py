"""The original INL-LLM package's `inl_llm.core` names, served by this project's ops:
IntegratorNeuronLayer, IntegratorModel, IntegratorLoss, compute_convergence_metrics,
create_cycle_scheduler. Their modules carry the original's names too
(`inl_llm.core.integrator_neuron_layer`, `.integrator_losses`, `.integrator_scheduler_v2`).
Where the original's code and the seed documents disagree the SPEC's math is kept; the README
lists every difference."""
from .integrator_losses import IntegratorLoss, compute_convergence_metrics
from .integrator_neuron_layer import IntegratorModel, IntegratorNeuronLayer
from .integrator_scheduler_v2 import CYCLE_PRESETS, EquilibriumExplorationScheduler, create_cycle_scheduler

__all__ = ["IntegratorNeuronLayer", "IntegratorModel", "IntegratorLoss", "compute_convergence_metrics",
           "create_cycle_scheduler", "EquilibriumExplorationScheduler", "CYCLE_PRESETS"]
