"""Rectified-flow math of Phased DMD, written as the equations of docs/method.md (cited as §N, Eq. (N)).

Convention (SD3, FLUX, Wan, Qwen-Image): x_t = (1 - t) x_0 + t eps, t = 1 is pure noise, and a model
predicts the velocity v(x_t, t) = E[eps - x_0 | x_t]. Every ``t`` / ``s`` argument is a float or a tensor
broadcastable against the leading (batch) dimension of the samples.
"""
from __future__ import annotations

import torch
from torch import Tensor

# docs/method.md §4, Eq. (20) (paper Eq. 13): the clamp on the subinterval weight 1 / sigma_{t|s}^2.
MAX_SUBINTERVAL_WEIGHT = 10.0


def _per_sample(t, like: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) timestep against a (B, ...) sample tensor."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim)) if t.ndim else t


def alpha(t):
    # Eq. (1): alpha_t = 1 - t
    return 1 - t


def sigma(t):
    # Eq. (1): sigma_t = t
    return t


def forward_process(x0: Tensor, eps: Tensor, t) -> Tensor:
    # Eq. (1): x_t = alpha_t x_0 + sigma_t eps
    t = _per_sample(t, x0)
    return alpha(t) * x0 + sigma(t) * eps


def x0_from_velocity(x_t: Tensor, t, v: Tensor) -> Tensor:
    # Eq. (2): x0_hat = x_t - t v
    return x_t - _per_sample(t, x_t) * v


def euler_step(x: Tensor, t, t_next, v: Tensor) -> Tensor:
    # x_{t'} = x_t + (t' - t) v; with the model's v this also projects x_t straight to any t' (Eq. (5); SGTS: §5, Eq. (22))
    return x + (_per_sample(t_next, x) - _per_sample(t, x)) * v


def shift_time(t, shift: float):
    # §2, Eq. (8): t' = shift t / (1 + (shift - 1) t)
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t, shift: float):
    # inverse of shift_time: t = t' / (shift - (shift - 1) t')
    return t / (shift - (shift - 1) * t)


def transition_coefficients(s, t):
    # §4, Eq. (16): alpha_{t|s} = (1-t)/(1-s),  sigma_{t|s}^2 = t^2 - alpha_{t|s}^2 s^2
    alpha_ts = alpha(t) / alpha(s)
    variance = sigma(t) ** 2 - alpha_ts**2 * sigma(s) ** 2
    # >= 0 for t >= s; clamped so rounding at t = s cannot produce a NaN
    variance = variance.clamp(min=0) if isinstance(variance, Tensor) else max(variance, 0.0)
    return alpha_ts, variance**0.5


def subinterval_transition(x_s: Tensor, eps: Tensor, s, t) -> Tensor:
    # §4, Eq. (16): x_t = alpha_{t|s} x_s + sigma_{t|s} eps   (s < t)
    alpha_ts, sigma_ts = transition_coefficients(_per_sample(s, x_s), _per_sample(t, x_s))
    return alpha_ts * x_s + sigma_ts * eps


def sample_nested_timesteps(s, n: int, shift: float = 1.0, generator: torch.Generator | None = None,
                            device=None) -> Tensor:
    """§4, Eq. (17): t ~ T(s, 1), the nested interval (s, 1) -- never the disjoint (t_k, t_{k-1}).

    u ~ U(0, 1) is shifted like the sampling schedule, then mapped onto (s, 1).
    ``s`` is a float or an (n,) tensor.
    """
    # u in (0, 1): t = s exactly would make sigma_{t|s} = 0 (and t = 0 a zero sigma_t for the velocity form)
    u = torch.rand(n, generator=generator, device=device).clamp(min=1e-6)
    s = torch.as_tensor(s, dtype=u.dtype, device=u.device)
    return s + (1 - s) * shift_time(u, shift)


def subinterval_target(x_s: Tensor, eps: Tensor, s, t) -> Tensor:
    """§4, Eq. (19): the unbiased flow target for x_t = alpha_{t|s} x_s + sigma_{t|s} eps (RF form).

    target = ((1-s)^2 t + (1-t) s^2) / ((1-s)^2 sigma_{t|s}) eps - x_s / (1-s);  at s = 0 it is eps - x_0.
    """
    _, sigma_ts = transition_coefficients(_per_sample(s, x_s), _per_sample(t, x_s))
    return scaled_subinterval_target(x_s, eps, s, t) / sigma_ts


def scaled_subinterval_target(x_s: Tensor, eps: Tensor, s, t) -> Tensor:
    """sigma_{t|s} * target, written without the division so it stays finite at t = s (Eq. (20), paper Eq. 13)."""
    s, t = _per_sample(s, x_s), _per_sample(t, x_s)
    _, sigma_ts = transition_coefficients(s, t)
    a_s, a_t, sig_s, sig_t = alpha(s), alpha(t), sigma(s), sigma(t)
    return (a_s**2 * sig_t + a_t * sig_s**2) / a_s**2 * eps - sigma_ts * x_s / a_s


def naive_subinterval_target(x_s: Tensor, eps: Tensor) -> Tensor:
    # §4, Eq. (18): the biased target eps - x_s (kept only so tests can show its bias)
    return eps - x_s


def subinterval_loss(v_pred: Tensor, x_s: Tensor, eps: Tensor, s, t,
                     max_weight: float = MAX_SUBINTERVAL_WEIGHT, mask: Tensor | None = None) -> Tensor:
    """§4, Eq. (20) (paper Eq. 13): J = E[ min(1/sigma_{t|s}^2, 10) || sigma_{t|s} F(x_t, t) - sigma_{t|s} target ||^2 ].

    The scaled form stays finite as t -> s, where the target itself blows up. Mean over all elements, or over those
    ``mask`` (x_s's shape, 0 or 1) keeps.
    """
    _, sigma_ts = transition_coefficients(_per_sample(s, x_s), _per_sample(t, x_s))
    weight = torch.clamp(1 / sigma_ts**2, max=max_weight)
    scaled_target = scaled_subinterval_target(x_s, eps, s, t).detach()
    squared = weight * (sigma_ts * v_pred - scaled_target) ** 2
    return squared.mean() if mask is None else (squared * mask).sum() / mask.sum()


def dmd_gradient_velocity(v_real: Tensor, v_fake: Tensor, s, t) -> Tensor:
    """§3, Eq. (12): grad_{x_s} KL = w_{t|s} (T(x_t, t) - F(x_t, t)),  w_{t|s} = alpha_t alpha_{t|s} / sigma_t.

    The gradient to descend: x_s - lr * grad moves x_s toward the teacher's distribution.
    """
    s, t = _per_sample(s, v_real), _per_sample(t, v_real)
    alpha_ts, _ = transition_coefficients(s, t)
    return alpha(t) * alpha_ts / sigma(t) * (v_real - v_fake)


def dmd_gradient_x0(x0_real: Tensor, x0_fake: Tensor, x_gen: Tensor, eps: float = 1e-6) -> Tensor:
    """§3, Eq. (13) (DMD2 form): g = (x0_F - x0_T) / mean|x_gen - x0_T|, normalised per sample."""
    dims = tuple(range(1, x_gen.ndim))
    norm = (x_gen - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return (x0_fake - x0_real) / norm


def dmd_loss(x_gen: Tensor, grad: Tensor) -> Tensor:
    # §3, Eq. (14): 0.5 || x_s - stopgrad(x_s - g) ||^2, averaged over elements as in DMD2 (gradient g / numel)
    target = (x_gen - grad).detach()
    return 0.5 * ((x_gen - target) ** 2).mean()


def flow_matching_loss(v_pred: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    # §1, Eq. (4): ordinary flow matching, target eps - x_0 (how a teacher is trained)
    return ((v_pred - (eps - x0)) ** 2).mean()
