import pytest
import torch

from pdmd.core.sampling import guided_velocity, sample_euler, sample_phased
from pdmd.core.schedule import PhaseSchedule
from pdmd.lab import Mixture, _mode_stats, mode_metrics, sliced_wasserstein

RING = Mixture.ring(8)


def _noise(n=4000, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def test_exact_velocity_with_many_steps_reproduces_the_mixture():
    out = sample_phased(RING.velocity, _noise(), PhaseSchedule.uniform(100))
    data = RING.sample(4000, torch.Generator().manual_seed(1))
    metrics = mode_metrics(out.sample, RING, _mode_stats(data, RING)[3])
    assert metrics["modes_covered"] == 8
    assert metrics["sliced_w"] < 0.05
    assert metrics["mode_kl"] < 0.01
    assert out.nfe == 100 and out.boundary_states == []


def test_few_steps_do_not_reproduce_it():
    """The test above can fail: a 2-step Euler sampler lands between the modes."""
    out = sample_phased(RING.velocity, _noise(), PhaseSchedule.uniform(2))
    assert sliced_wasserstein(out.sample, RING.sample(4000, torch.Generator().manual_seed(1))) > 0.1


def test_boundary_states_have_their_timesteps_and_marginals():
    schedule = PhaseSchedule((0.7, 0.3), (40, 40, 40))
    out = sample_phased([RING.velocity] * 3, _noise(), schedule)
    assert [t for t, _ in out.boundary_states] == [0.7, 0.3]
    for t, x in out.boundary_states:
        assert sliced_wasserstein(x, RING.sample_pt(4000, t, torch.Generator().manual_seed(2))) < 0.05


def test_each_phase_uses_its_own_expert_and_callback_sees_every_step():
    schedule = PhaseSchedule((0.6,), (2, 3))
    calls = []

    def expert(k):
        def velocity(x, t, cond):
            calls.append((k, float(t[0])))
            return torch.zeros_like(x)
        return velocity

    steps = []
    sample_phased([expert(0), expert(1)], _noise(8), schedule, callback=steps.append)
    assert [k for k, _ in calls] == list(schedule.phase_of_step)
    assert [t for _, t in calls] == pytest.approx(schedule.timesteps[:-1])  # t reaches the model as float32
    assert [s["i"] for s in steps] == list(range(5))
    assert [s["phase"] for s in steps] == list(schedule.phase_of_step)
    assert [s["sigma"] for s in steps] == list(schedule.timesteps[:-1])
    assert set(steps[0]) >= {"i", "phase", "sigma", "sigma_next", "x", "denoised", "velocity"}


def test_one_phase_is_the_plain_euler_sampler():
    schedule = PhaseSchedule.uniform(7, shift=3.0)
    phased = sample_phased(RING.velocity, _noise(), schedule).sample
    plain = sample_euler(RING.velocity, _noise(), schedule.timesteps)
    torch.testing.assert_close(phased, plain)


def test_classifier_free_guidance_and_its_nfe():
    def model(x, t, cond):
        return torch.full_like(x, float(cond))

    x, t = torch.zeros(3, 2), torch.ones(3)
    torch.testing.assert_close(guided_velocity(model, x, t, 2.0, 0.0, 4.0), torch.full((3, 2), 8.0))
    torch.testing.assert_close(guided_velocity(model, x, t, 2.0, 0.0, 1.0), torch.full((3, 2), 2.0))
    schedule = PhaseSchedule((0.5,), (2, 2))
    assert sample_phased(model, x, schedule, 1.0, uncond=0.0, cfg=3.0).nfe == 8
    assert sample_phased(model, x, schedule, 1.0).nfe == 4


def test_expert_count_must_match_phases():
    with pytest.raises(ValueError, match="2 experts for a schedule of 3 phases"):
        sample_phased([RING.velocity] * 2, _noise(4), PhaseSchedule((0.6, 0.3), 1))
