"""The equilibrium–exploration cycle scheduler of the seeds.

Training runs a warmup, then `num_cycles` cycles of an equilibrium phase (strong pull toward
mu, no excitation: consolidate) followed by an exploration phase (weak pull, harmonic
excitation on: discover). After the last cycle it stays in equilibrium. Each phase sets the
integrators' excitation amplitude and the IntegratorLoss weights (λ_mean level, λ_energy);
the warmup uses the equilibrium values.

The unit of every duration is explicit: `unit="epochs"` (the seeds' unit; the trainer then
calls `step(epoch)`) or `unit="steps"` (`step(optimizer_step)`).

Presets (durations in the scheduler's unit; λ_energy 0.01 / 0.001 in every preset):

    preset        warmup  equilibrium (dur, λ_mean, amp)  exploration (dur, λ_mean, amp)  cycles
    conservative    15        15, 0.8, 0.0                    10, 0.1,  0.02                 5
    balanced        10        10, 0.5, 0.0                    20, 0.05, 0.05                 5   (the seeds)
    aggressive       5         5, 0.3, 0.0                    25, 0.02, 0.1                  5

The seeds give `balanced` only; the other two are ours: more consolidation and gentler
excitation, or the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class PhaseConfig:
    duration: int
    lambda_mean: float
    excitation_amplitude: float
    lambda_energy: float


@dataclass(frozen=True)
class PhaseInfo:
    phase_name: str  # "warmup", "equilibrium" or "exploration"
    is_exploration: bool
    lambda_mean: float
    lambda_energy: float
    excitation_amplitude: float
    cycle: int  # 0-based; -1 during warmup, num_cycles after the last cycle
    position: int  # how far into the phase, in the scheduler's unit


UNITS = ("epochs", "steps")


class CycleScheduler:
    def __init__(self, equilibrium: PhaseConfig, exploration: PhaseConfig, num_cycles: int = 5,
                 warmup: int = 10, unit: str = "epochs"):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if equilibrium.duration < 1 or exploration.duration < 1:
            raise ValueError("phase durations must be >= 1")
        if num_cycles < 0 or warmup < 0:
            raise ValueError("num_cycles and warmup must be >= 0")
        self.equilibrium, self.exploration = equilibrium, exploration
        self.num_cycles, self.warmup, self.unit = num_cycles, warmup, unit
        self.current: Optional[PhaseInfo] = None

    @property
    def cycle_length(self) -> int:
        return self.equilibrium.duration + self.exploration.duration

    @property
    def total(self) -> int:
        """Length of warmup plus every cycle, in the scheduler's unit."""
        return self.warmup + self.num_cycles * self.cycle_length

    def phase(self, t: int) -> PhaseInfo:
        """The phase at time t (an epoch or a step, per `unit`)."""
        if t < 0:
            raise ValueError(f"t must be >= 0, got {t}")
        if t < self.warmup:
            return self._info("warmup", self.equilibrium, -1, t)
        t -= self.warmup
        cycle, within = divmod(t, self.cycle_length)
        if cycle >= self.num_cycles:
            return self._info("equilibrium", self.equilibrium, self.num_cycles, t - self.num_cycles * self.cycle_length)
        if within < self.equilibrium.duration:
            return self._info("equilibrium", self.equilibrium, cycle, within)
        return self._info("exploration", self.exploration, cycle, within - self.equilibrium.duration)

    def step(self, t: int) -> PhaseInfo:
        self.current = self.phase(t)
        return self.current

    @staticmethod
    def _info(name, cfg: PhaseConfig, cycle, position) -> PhaseInfo:
        return PhaseInfo(name, name == "exploration", cfg.lambda_mean, cfg.lambda_energy, cfg.excitation_amplitude,
                         cycle, position)


PRESETS = {
    "conservative": dict(equilibrium=PhaseConfig(15, 0.8, 0.0, 0.01), exploration=PhaseConfig(10, 0.1, 0.02, 0.001),
                         num_cycles=5, warmup=15),
    "balanced": dict(equilibrium=PhaseConfig(10, 0.5, 0.0, 0.01), exploration=PhaseConfig(20, 0.05, 0.05, 0.001),
                     num_cycles=5, warmup=10),
    "aggressive": dict(equilibrium=PhaseConfig(5, 0.3, 0.0, 0.01), exploration=PhaseConfig(25, 0.02, 0.1, 0.001),
                       num_cycles=5, warmup=5),
}


def create_cycle_scheduler(preset: str = "balanced", unit: str = "epochs", scale: float = 1.0,
                           **overrides) -> CycleScheduler:
    """A preset; `scale` multiplies every duration (e.g. to map the seeds' epochs onto a run
    counted in steps), keyword arguments override the preset's fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    args = {**PRESETS[preset], **overrides}
    if scale != 1.0:
        stretch = lambda n: max(1, round(n * scale))  # noqa: E731
        args["equilibrium"] = replace(args["equilibrium"], duration=stretch(args["equilibrium"].duration))
        args["exploration"] = replace(args["exploration"], duration=stretch(args["exploration"].duration))
        args["warmup"] = round(args["warmup"] * scale)
    return CycleScheduler(unit=unit, **args)
