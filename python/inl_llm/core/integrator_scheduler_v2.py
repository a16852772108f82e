"""The original package's cycle scheduler API (`create_cycle_scheduler(preset, **overrides)`,
`scheduler.step(epoch)` -> a dict-like phase_info), served by `inl_llm.scheduler.CycleScheduler`.

Phase configs are the original's dicts: {'lambda_mean', 'excitation_amplitude',
'duration_epochs'} (plus our optional 'lambda_energy'). The presets and the phase after the last
cycle are ours (README, "Compatibility with the original package"): warmup, then num_cycles ×
(equilibrium, exploration), then equilibrium for good.
"""
from __future__ import annotations

from typing import Optional

from ..scheduler import PRESETS, CycleScheduler, PhaseConfig, PhaseInfo


class PhaseDict(dict):
    """phase_info: the original's keys ('phase_name' — 'equilibrium' or 'exploration', warmup
    included as in the original —, 'lambda_mean', 'excitation_amplitude', 'is_exploration') and
    ours ('lambda_energy', 'is_warmup', 'cycle', 'position'); readable as attributes too."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _phase(config: Optional[dict], default: PhaseConfig, name: str) -> PhaseConfig:
    if config is None:
        return default
    if not isinstance(config, dict):
        raise TypeError(f"{name} must be a dict, got {type(config).__name__}")
    unknown = set(config) - {"lambda_mean", "excitation_amplitude", "duration_epochs", "lambda_energy"}
    if unknown:
        raise ValueError(f"{name} has unknown keys {sorted(unknown)}")
    return PhaseConfig(duration=int(config.get("duration_epochs", default.duration)),
                       lambda_mean=float(config.get("lambda_mean", default.lambda_mean)),
                       excitation_amplitude=float(config.get("excitation_amplitude", default.excitation_amplitude)),
                       lambda_energy=float(config.get("lambda_energy", default.lambda_energy)))


def _as_dict(phase: PhaseConfig) -> dict:
    return {"lambda_mean": phase.lambda_mean, "excitation_amplitude": phase.excitation_amplitude,
            "duration_epochs": phase.duration, "lambda_energy": phase.lambda_energy}


class EquilibriumExplorationScheduler(CycleScheduler):
    def __init__(self, equilibrium_config: Optional[dict] = None, exploration_config: Optional[dict] = None,
                 num_cycles: int = 5, warmup_epochs: int = 10, unit: str = "epochs"):
        balanced = PRESETS["balanced"]
        super().__init__(_phase(equilibrium_config, balanced["equilibrium"], "equilibrium_config"),
                         _phase(exploration_config, balanced["exploration"], "exploration_config"),
                         num_cycles=num_cycles, warmup=warmup_epochs, unit=unit)

    @staticmethod
    def _dict(info: PhaseInfo) -> PhaseDict:
        return PhaseDict(phase_name="exploration" if info.is_exploration else "equilibrium",
                         lambda_mean=info.lambda_mean, excitation_amplitude=info.excitation_amplitude,
                         is_exploration=info.is_exploration, lambda_energy=info.lambda_energy,
                         is_warmup=info.phase_name == "warmup", cycle=info.cycle, position=info.position)

    def step(self, epoch: int) -> PhaseDict:
        """Records and returns the phase at `epoch`."""
        return self._dict(super().step(epoch))

    def get_phase_config(self, epoch: int) -> PhaseDict:
        return self._dict(self.phase(epoch))

    def is_exploration_phase(self, epoch: int) -> bool:
        return self.phase(epoch).is_exploration

    def get_total_epochs(self) -> int:
        """Warmup plus every cycle."""
        return self.total

    def print_schedule(self):
        print(f"warmup: {self.warmup} {self.unit} (equilibrium settings)")
        for name, cfg in (("equilibrium", self.equilibrium), ("exploration", self.exploration)):
            print(f"{name}: {cfg.duration} {self.unit}, lambda_mean {cfg.lambda_mean}, excitation amplitude "
                  f"{cfg.excitation_amplitude}, lambda_energy {cfg.lambda_energy}")
        print(f"{self.num_cycles} cycles, {self.total} {self.unit} in all, then equilibrium")


CYCLE_PRESETS = {name: {"equilibrium_config": _as_dict(p["equilibrium"]),
                        "exploration_config": _as_dict(p["exploration"]),
                        "num_cycles": p["num_cycles"], "warmup_epochs": p["warmup"]}
                 for name, p in PRESETS.items()}


def create_cycle_scheduler(preset: str = "balanced", **overrides) -> EquilibriumExplorationScheduler:
    """A preset ('conservative', 'balanced', 'aggressive'); keyword arguments replace its
    entries (equilibrium_config, exploration_config, num_cycles, warmup_epochs, unit). A phase
    dict that gives some of its keys takes the rest from this preset."""
    if preset not in CYCLE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(CYCLE_PRESETS)}")
    known = {"equilibrium_config", "exploration_config", "num_cycles", "warmup_epochs", "unit"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"create_cycle_scheduler got unknown arguments {unknown}; it takes {sorted(known)}")
    base = CYCLE_PRESETS[preset]
    for key in ("equilibrium_config", "exploration_config"):  # a partial phase dict completes from this preset
        if isinstance(overrides.get(key), dict) and isinstance(base.get(key), dict):
            overrides[key] = {**base[key], **overrides[key]}
    return EquilibriumExplorationScheduler(**{**base, **overrides})
