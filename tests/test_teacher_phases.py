"""A student with some phases handed back to the teacher (Student.with_teacher_phases, teacher_takes_phases), the
boundary fidelity built on it, and the summary over eval seeds."""
from __future__ import annotations

import math

import pytest
import torch

from pdmd.builtin.evaluate import boundary_fidelity, mean_and_std
from pdmd.core.sampling import sample_phased, teacher_takes_phases
from pdmd.core.schedule import PhaseSchedule
from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students.folder import load_student

PROMPTS = ["a red star on a dark background", "a blue circle on a light background"]


@pytest.fixture(scope="module")
def student():
    return load_student(SHIPPED_STUDENTS / "phased")  # 1 + 3 steps, boundary 0.75, student CFG 1


def test_every_phase_by_the_teacher_is_the_teachers_own_sampler_on_those_timesteps(student):
    teacher = student.roles.teacher
    steps = student.teacher_steps_per_phase()
    hybrid = student.sample(PROMPTS, seed=3, teacher_phases=[0, 1])
    with student.roles.active(None):
        own = teacher.sample(PROMPTS, 3, PhaseSchedule(student.schedule.boundaries, (steps, steps)))
    assert torch.equal(hybrid.sample, own.sample)
    assert hybrid.nfe == own.nfe == 2 * steps * 2  # two phases of ``steps``, each step guided: 2 evaluations


def test_no_phase_by_the_teacher_is_the_student(student):
    plain = student.sample(PROMPTS, seed=3)
    with student.roles.active(None):
        experts_alone = student.roles.teacher.sample(PROMPTS, 3, student.schedule, student.cfg, student.experts)
    assert torch.equal(plain.sample, experts_alone.sample) and plain.nfe == student.schedule.nfe == 4


def test_one_phase_by_the_teacher_keeps_the_other_and_counts_its_cfg(student):
    plain = student.sample(PROMPTS, seed=3)
    second = student.sample(PROMPTS, seed=3, teacher_phases=[1])
    (t, x_plain), (t_hybrid, x_hybrid) = plain.boundary_states[0], second.boundary_states[0]
    assert t == t_hybrid == 0.75 and torch.equal(x_plain, x_hybrid)  # the student's own phase 1, same noise
    assert not torch.equal(plain.sample, second.sample)
    assert second.nfe == 1 + student.teacher_steps_per_phase() * 2  # 1 student step, then guided teacher steps
    schedule, _, cfg = student.with_teacher_phases([1], teacher_steps=5, teacher_cfg=2.0)
    assert schedule.steps == (1, 5) and schedule.boundaries == (0.75,) and cfg == (1.0, 2.0)


def test_per_phase_cfg_counts_two_evaluations_only_where_guided():
    calls = []

    def velocity(x, t, cond):
        calls.append(cond)
        return torch.zeros_like(x)

    result = sample_phased(velocity, torch.zeros(1, 2), PhaseSchedule((0.5,), (2, 3)), "c", uncond="u",
                           cfg=(1.0, 4.0))
    assert result.nfe == 2 + 3 * 2 == len(calls) and calls.count("u") == 3


def test_phases_outside_the_schedule_are_refused():
    with pytest.raises(ValueError, match=r"phase\(s\) \[3\] outside the schedule's 2 phase"):
        teacher_takes_phases(PhaseSchedule((0.5,), (2, 2)), [None, None], 1.0, None, 5.0, [2], 4)


def test_boundary_fidelity_gives_one_finite_fd_per_boundary(student):
    scores = boundary_fidelity(student, prompts=PROMPTS[:1], per_prompt=4, teacher_steps=2)
    assert list(scores) == [0.75] and math.isfinite(scores[0.75]) and scores[0.75] >= 0
    one_phase = load_student(SHIPPED_STUDENTS / "dmd")
    assert boundary_fidelity(one_phase, prompts=PROMPTS[:1], per_prompt=2) == {}


def test_mean_and_std_over_seeds():
    rows = [{"fd": 1.0, "adherence": 0.5}, {"fd": 3.0, "adherence": 0.5}, {"fd": 5.0, "adherence": 0.5}]
    assert mean_and_std(rows, ["fd", "adherence"]) == {"fd": (3.0, 2.0), "adherence": (0.5, 0.0)}
    assert mean_and_std(rows[:1], ["fd"]) == {"fd": (1.0, 0.0)}
