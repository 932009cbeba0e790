import math

import pytest

from pdmd.core.schedule import PRESETS, PhaseSchedule, ScheduleError, preset


@pytest.mark.parametrize("boundaries, steps, shift, message", [
    ("0.6, 0.9", 1, 1, "boundary 0.9 follows 0.6; boundaries must be strictly decreasing"),
    ("0.5, 0.5", 1, 1, "boundary 0.5 appears twice"),
    ("1.2", 1, 1, "boundary 1.2 must lie strictly between 0 and 1"),
    ("0", 1, 1, "boundary 0.0 must lie strictly between 0 and 1"),
    ("1", 1, 1, "boundary 1.0 must lie strictly between 0 and 1"),
    ("-0.3", 1, 1, "boundary -0.3 must lie strictly between 0 and 1"),
    ("nan", 1, 1, "boundary nan must be a finite number"),
    ("0.5, abc", 1, 1, "boundary 'abc' is not a number"),
    ([0.5, None], 1, 1, "boundary None is not a number"),
    ([True], 1, 1, "boundary True is not a number"),
    ("0.5", 0, 1, "steps of phase 1 = 0 must be at least 1"),
    ("0.5", "2, -1", 1, "steps of phase 2 = -1 must be at least 1"),
    ("0.5", "2, x", 1, "steps of phase 2 'x' is not a number"),
    ("0.5", 1.5, 1, "steps of phase 1 = 1.5 must be a whole number"),
    ("0.5", [], 1, "steps is empty: a schedule needs at least one phase"),
    ("0.5", [1, 1, 1], 1, "lists 3 phases but 1 boundaries make 2"),
    ("0.5", 1, 0, "shift 0 must lie between 0.01 and 100"),
    ("0.5", 1, 1e308, "shift 1e+308 must lie between 0.01 and 100"),
    ("0.5", 1, 1e-308, "shift 1e-308 must lie between 0.01 and 100"),
    ("0.5", 600, 1, "1200 steps in all; a schedule has at most 1000"),
    ("0.5", 1, "big", "shift 'big' is not a number"),
])
def test_invalid_schedules_raise_one_error_naming_value_and_rule(boundaries, steps, shift, message):
    with pytest.raises(ScheduleError) as err:
        PhaseSchedule(boundaries, steps, shift)
    assert message in str(err.value)


def test_schedule_error_is_a_value_error():
    assert issubclass(ScheduleError, ValueError)


def test_parse_string_yaml_and_keywords_agree():
    from_text = PhaseSchedule.parse("0.9, 0.6", "1, 2, 3", "3")
    from_kwargs = PhaseSchedule(boundaries=(0.9, 0.6), steps=(1, 2, 3), shift=3.0)
    from_yaml = PhaseSchedule.from_yaml("schedule:\n  boundaries: [0.9, 0.6]\n  steps: [1, 2, 3]\n  shift: 3\n")
    assert from_text == from_kwargs == from_yaml
    assert PhaseSchedule.parse("0.875").boundaries == (0.875,)
    assert PhaseSchedule.from_yaml("boundaries: 0.875\nsteps: 2\n").steps == (2, 2)


def test_yaml_file_and_preset_overrides(tmp_path):
    path = tmp_path / "schedule.yaml"
    path.write_text("preset: wan2.2-lightning\nsteps: [3, 1]\n")
    schedule = PhaseSchedule.from_yaml(path)
    assert schedule.boundaries == (0.87,) and schedule.steps == (3, 1) and schedule.shift == 5.0
    assert PhaseSchedule.from_yaml(str(path)) == schedule


@pytest.mark.parametrize("text, message", [
    ("boundaries: [0.5]\nstep: 2\n", "unknown schedule key(s) ['step']"),
    ("- 0.5\n", "must be a mapping"),
    ("boundaries: [0.5\n", "does not parse"),
    ("preset: nope\n", "unknown schedule preset 'nope'"),
])
def test_bad_yaml_is_named(text, message):
    with pytest.raises(ScheduleError, match=None) as err:
        PhaseSchedule.from_yaml(text)
    assert message in str(err.value)


def test_shift_spacing_nfe_and_membership():
    schedule = PhaseSchedule.uniform(4, shift=5.0)
    expected = [5 * u / (1 + 4 * u) for u in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert schedule.timesteps == pytest.approx(expected)
    assert schedule.nfe == 4 and schedule.num_phases == 1 and schedule.phase_of_step == (0, 0, 0, 0)

    phased = PhaseSchedule((0.7, 0.3), (3, 2, 4), 2.0)
    ts = phased.timesteps
    assert len(ts) == phased.nfe + 1 == 10
    assert ts[0] == 1.0 and ts[-1] == 0.0 and all(a > b for a, b in zip(ts, ts[1:]))
    assert phased.phase_of_step == (0, 0, 0, 1, 1, 2, 2, 2, 2)
    assert phased.boundary_step_indices == (3, 5, 9)
    assert ts[3] == pytest.approx(0.7) and ts[5] == pytest.approx(0.3)
    # every step's phase is the phase its starting timestep falls in
    assert tuple(phased.phase_at(t) for t in ts[:-1]) == phased.phase_of_step


def test_log_snr_at_boundaries():
    schedule = PhaseSchedule((0.5, 0.2), 1)
    assert schedule.boundary_log_snr == pytest.approx((0.0, 2 * math.log(4.0)))


def test_presets():
    assert preset("paper-2x2").steps == (2, 2) and preset("paper-2x2").nfe == 4
    lightning = preset("wan2.2-lightning")
    assert lightning.boundaries == (0.87,) and lightning.shift == 5.0 and lightning.nfe == 4
    one_step = preset("one-step-per-phase")
    assert set(one_step.steps) == {1} and one_step.num_phases == len(one_step.boundaries) + 1
    assert set(PRESETS) == {"paper-2x2", "wan2.2-lightning", "one-step-per-phase"}
    with pytest.raises(ScheduleError, match="unknown schedule preset"):
        preset("fast")


def test_schedule_is_frozen_and_round_trips():
    schedule = preset("wan2.2-lightning")
    with pytest.raises(AttributeError):
        schedule.shift = 3.0
    assert PhaseSchedule.from_dict(schedule.as_dict()) == schedule
