"""The shared objective: back-simulation, SGTS and the re-noising interval."""
import pytest
import torch

from pdmd.core import distill
from pdmd.core.schedule import PhaseSchedule


class CountingExpert:
    """A velocity that records (t, whether grad was on) for every call."""

    def __init__(self):
        self.calls = []
        self.weight = torch.nn.Parameter(torch.tensor(0.5))

    def __call__(self, x, t, cond):
        self.calls.append((round(float(t[0]), 4), torch.is_grad_enabled()))
        return self.weight * x


SCHEDULE = PhaseSchedule((0.6,), (3, 2))


def test_rollout_back_simulates_frozen_earlier_phases_and_trains_the_current_one():
    experts = [CountingExpert(), CountingExpert()]
    x_s, s = distill.rollout(experts, 1, SCHEDULE, torch.randn(4, 2))
    assert s == 0.0
    assert [grad for _, grad in experts[0].calls] == [False] * 3   # phase 1: frozen, no grad
    assert [grad for _, grad in experts[1].calls] == [True] * 2    # phase 2: every step carries grad
    x_s.sum().backward()
    assert experts[1].weight.grad is not None and experts[0].weight.grad is None


def test_sgts_backpropagates_through_one_exit_step_projected_to_the_phase_end():
    exits = set()
    for seed in range(20):
        expert = CountingExpert()
        x_s, s = distill.rollout([expert, CountingExpert()], 0, SCHEDULE, torch.randn(4, 2), sgts=True,
                                 generator=torch.Generator().manual_seed(seed))
        assert s == pytest.approx(0.6)
        grads = [grad for _, grad in expert.calls]
        assert grads.count(True) == 1 and grads[-1]  # steps before the exit run without grad
        exits.add(len(grads))
    assert exits == {1, 2, 3}  # every step of the phase can be the exit


def test_renoise_draws_t_in_the_nested_interval():
    """Phase 2 of boundaries (0.6, 0.3) ends at s = 0.3: t ~ T(0.3, 1), reaching above the phase's own start 0.6."""
    from pdmd.core.rectified_flow import transition_coefficients

    t, eps, x_t = distill.renoise(torch.zeros(20_000, 2), 0.3, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0.3 and t.max() < 1.0
    assert abs(float((t > 0.6).float().mean()) - 0.4 / 0.7) < 0.02  # not the disjoint (0.3, 0.6)
    _, sigma_ts = transition_coefficients(0.3, t)
    torch.testing.assert_close(x_t, sigma_ts[:, None] * eps)  # x_s = 0: only the kernel's noise remains


def test_generator_loss_rejects_an_unknown_gradient_form():
    expert = CountingExpert()
    with pytest.raises(ValueError, match="unknown DMD gradient form 'score'"):
        distill.generator_loss(torch.randn(4, 2), 0.0, expert, expert, gradient="score")


def test_regression_pairs_are_the_teachers_own_steps_and_a_teacher_expert_reproduces_them():
    """teacher_states solves each phase with its own Euler steps; an expert that is the teacher, taking the same
    number of steps per phase, lands exactly on the next state (zero regression loss) -- any other does not."""
    schedule = PhaseSchedule((0.6,), (2, 2))
    teacher = lambda x, t, cond: x - 1.0  # noqa: E731 (an affine velocity: Euler steps do not solve it exactly)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    states = distill.teacher_states(teacher, schedule, noise, steps_per_phase=2)
    assert len(states) == 3 and torch.equal(states[0], noise)
    for phase in range(2):
        assert distill.regression_loss([teacher, teacher], phase, schedule, states[phase], states[phase + 1]) == 0
    finer = distill.teacher_states(teacher, schedule, noise, steps_per_phase=8)
    assert distill.regression_loss([teacher, teacher], 0, schedule, finer[0], finer[1]) > 1e-4
    expert = CountingExpert()
    distill.regression_loss([expert, expert], 1, schedule, states[1], states[2]).backward()
    assert [t for t, _ in expert.calls] == [0.6, 0.3] and expert.weight.grad is not None
