"""The rectified-flow math against closed form: a Gaussian mixture whose p_t and velocity are exact."""
import pytest
import torch

from pdmd.core import rectified_flow as rf
from pdmd.lab import Mixture, sliced_wasserstein

# Modes on the x-axis with unequal weights: the posterior over modes depends only on the x-coordinate,
# so E[target | x_t] can be checked by binning x_t's first coordinate.
LINE = Mixture(torch.tensor([[-2.0, 0.0], [0.5, 0.0], [2.0, 0.0]]), torch.tensor([0.5, 0.2, 0.3]), std=0.3)


def _binned_gap(values, exact, coordinate, bins=20, min_count=3000):
    """Largest |bin mean of values - bin mean of exact| over well-populated bins of ``coordinate``."""
    edges = torch.quantile(coordinate, torch.linspace(0.02, 0.98, bins + 1))
    index = torch.bucketize(coordinate.contiguous(), edges)
    gaps = []
    for b in range(1, bins + 1):
        mask = index == b
        if mask.sum() >= min_count:
            gaps.append((values[mask].mean() - exact[mask].mean()).abs())
    assert len(gaps) >= bins // 2
    return float(torch.stack(gaps).max())


@pytest.mark.parametrize("s,t", [(0.0, 0.5), (0.2, 0.35), (0.3, 0.6), (0.5, 0.9)])
def test_unbiased_subinterval_target_regresses_to_exact_velocity(s, t):
    g = torch.Generator().manual_seed(0)
    n = 250_000
    x_s = LINE.sample_pt(n, s, g)
    eps = torch.randn(n, 2, generator=g)
    x_t = rf.subinterval_transition(x_s, eps, s, t)
    exact = LINE.velocity(x_t, torch.full((n,), t))[:, 0]
    unbiased = rf.subinterval_target(x_s, eps, s, t)[:, 0]
    # E[target | x_t] = v(x_t): bin averages agree up to Monte-Carlo noise (~0.02 at this n).
    assert _binned_gap(unbiased, exact, x_t[:, 0]) < 0.06
    if s > 0:  # the naive target eps - x_s is biased: its regression is not the velocity of p_t
        naive = rf.naive_subinterval_target(x_s, eps)[:, 0]
        assert _binned_gap(naive, exact, x_t[:, 0]) > 0.3


def test_target_at_s_zero_is_flow_matching_target():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    t = torch.rand(64, generator=g)
    torch.testing.assert_close(rf.subinterval_target(x0, eps, 0.0, t), eps - x0)
    torch.testing.assert_close(rf.subinterval_transition(x0, eps, 0.0, t), rf.forward_process(x0, eps, t))


def test_transition_composes_with_forward_process():
    """x_s ~ p_s re-noised by the kernel has the marginal p_t: same mean and variance as the forward process."""
    s, t, n = 0.3, 0.7, 50_000
    g = torch.Generator().manual_seed(2)
    x_s = LINE.sample_pt(n, s, g)
    renoised = rf.subinterval_transition(x_s, torch.randn(n, 2, generator=g), s, t)
    direct = LINE.sample_pt(n, t, g)
    assert sliced_wasserstein(renoised, direct) < 0.02


def test_subinterval_loss_is_finite_and_clamped_near_s():
    g = torch.Generator().manual_seed(3)
    x_s, eps = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    s = 0.4
    for t in (torch.full((32,), s + 1e-6), torch.full((32,), s)):  # t = s exactly: sigma_{t|s} = 0
        assert torch.isfinite(rf.subinterval_loss(torch.zeros(32, 2), x_s, eps, s, t))
    assert torch.isfinite(rf.subinterval_loss(torch.zeros(32, 2), x_s, eps, 0.0, torch.zeros(32)))
    # far from s the weight is 1/sigma^2 < 10: the loss equals the plain MSE against the target
    t_far = torch.full((32,), 0.95)
    target = rf.subinterval_target(x_s, eps, s, t_far)
    torch.testing.assert_close(rf.subinterval_loss(torch.zeros(32, 2), x_s, eps, s, t_far), (target**2).mean())


def test_nested_timesteps_lie_in_s_to_one_and_follow_the_shift():
    g = torch.Generator().manual_seed(4)
    t = rf.sample_nested_timesteps(0.6, 50_000, generator=g)
    assert t.min() >= 0.6 and t.max() <= 1.0
    assert abs(float(t.mean()) - 0.8) < 0.01
    shifted = rf.sample_nested_timesteps(0.0, 50_000, shift=3.0, generator=g)
    assert float(shifted.mean()) > 0.6  # shift > 1 puts more samples at high noise


def test_shift_formula_and_inverse():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(rf.shift_time(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(rf.unshift_time(rf.shift_time(t, 5.0), 5.0), t)
    torch.testing.assert_close(rf.shift_time(t, 1.0), t)


STEP_SIZE = {"velocity": 0.05, "x0": 0.02}  # the x0 form is normalised, the velocity form is not


def _dmd_moves(s, sign, form):
    """Apply DMD steps to a shifted generator with exact teacher and fake scores; return (before, after) SW."""
    g = torch.Generator().manual_seed(5)
    offset = torch.tensor([0.6, -0.4])
    shifted = Mixture(LINE.means + offset, LINE.weights, LINE.std)
    x_s = shifted.sample_pt(5_000, s, g)
    target = LINE.sample_pt(5_000, s, g)
    before = sliced_wasserstein(x_s, target)
    for _ in range(10):
        t = rf.sample_nested_timesteps(s, len(x_s), generator=g)
        x_t = rf.subinterval_transition(x_s, torch.randn(x_s.shape, generator=g), s, t)
        v_real, v_fake = LINE.velocity(x_t, t), shifted.velocity(x_t, t)
        if form == "velocity":
            grad = rf.dmd_gradient_velocity(v_real, v_fake, s, t)
        else:
            grad = rf.dmd_gradient_x0(rf.x0_from_velocity(x_t, t, v_real), rf.x0_from_velocity(x_t, t, v_fake), x_s)
        x_s = x_s - sign * STEP_SIZE[form] * grad  # gradient descent on the KL (sign=+1)
    return before, sliced_wasserstein(x_s, target)


@pytest.mark.parametrize("form", ["velocity", "x0"])
@pytest.mark.parametrize("s", [0.0, 0.5])
def test_dmd_gradient_moves_generator_toward_data(form, s):
    before, after = _dmd_moves(s, +1, form)
    assert after < 0.8 * before
    before, after = _dmd_moves(s, -1, form)  # the flipped sign pushes samples away
    assert after > 1.1 * before


def test_dmd_loss_gradient_is_the_dmd_direction():
    x = torch.randn(8, 2, requires_grad=True)
    grad = torch.randn(8, 2)
    rf.dmd_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())
