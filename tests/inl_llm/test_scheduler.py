"""The equilibrium–exploration cycle scheduler: phase boundaries, presets, units."""
import pytest

from inl_llm import PRESETS, CycleScheduler, PhaseConfig, create_cycle_scheduler


def test_balanced_preset_is_the_seeds_schedule():
    s = create_cycle_scheduler("balanced")
    assert s.unit == "epochs"
    assert (s.warmup, s.num_cycles) == (10, 5)
    assert s.equilibrium == PhaseConfig(10, 0.5, 0.0, 0.01)
    assert s.exploration == PhaseConfig(20, 0.05, 0.05, 0.001)
    assert s.total == 10 + 5 * 30 == 160


@pytest.mark.parametrize("t, name, cycle, position", [
    (0, "warmup", -1, 0), (9, "warmup", -1, 9),
    (10, "equilibrium", 0, 0), (19, "equilibrium", 0, 9),
    (20, "exploration", 0, 0), (39, "exploration", 0, 19),
    (40, "equilibrium", 1, 0), (159, "exploration", 4, 19),
    (160, "equilibrium", 5, 0), (500, "equilibrium", 5, 340),  # after the last cycle: consolidate
])
def test_phase_boundaries(t, name, cycle, position):
    info = create_cycle_scheduler("balanced").phase(t)
    assert (info.phase_name, info.cycle, info.position) == (name, cycle, position)
    assert info.is_exploration == (name == "exploration")
    expected_amp = 0.05 if name == "exploration" else 0.0
    assert info.excitation_amplitude == expected_amp
    assert info.lambda_mean == (0.05 if name == "exploration" else 0.5)
    assert info.lambda_energy == (0.001 if name == "exploration" else 0.01)


def test_presets_differ_as_documented():
    cons, bal, aggr = (create_cycle_scheduler(p) for p in ("conservative", "balanced", "aggressive"))
    assert cons.exploration.excitation_amplitude < bal.exploration.excitation_amplitude < \
        aggr.exploration.excitation_amplitude
    assert cons.equilibrium.lambda_mean > bal.equilibrium.lambda_mean > aggr.equilibrium.lambda_mean
    assert set(PRESETS) == {"conservative", "balanced", "aggressive"}


def test_unit_scale_and_overrides():
    s = create_cycle_scheduler("balanced", unit="steps", scale=2.0, num_cycles=2)
    assert s.unit == "steps"
    assert (s.warmup, s.equilibrium.duration, s.exploration.duration, s.total) == (20, 20, 40, 140)
    assert s.step(25).phase_name == "equilibrium" and s.current.phase_name == "equilibrium"
    assert s.step(40).phase_name == "exploration"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unit"):
        CycleScheduler(PhaseConfig(1, 0.5, 0, 0.01), PhaseConfig(1, 0.05, 0.05, 0.001), unit="minutes")
    with pytest.raises(ValueError, match="preset"):
        create_cycle_scheduler("wild")
    with pytest.raises(ValueError, match="durations"):
        CycleScheduler(PhaseConfig(0, 0.5, 0, 0.01), PhaseConfig(1, 0.05, 0.05, 0.001))
    with pytest.raises(ValueError, match="t must be"):
        create_cycle_scheduler().phase(-1)
