"""Euler samplers over a phase schedule, k-diffusion style: plain functions ``(model, x, sigmas, ...)``.

A model (teacher or expert) is any callable ``velocity(x, t, cond)`` with ``t`` a (B,) tensor. The sampler
is not wrapped in ``no_grad``: the trainer back-propagates through an expert's own steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from pdmd.core.rectified_flow import euler_step, x0_from_velocity
from pdmd.core.schedule import PhaseSchedule

Velocity = Callable[[Tensor, Tensor, Any], Tensor]
Callback = Callable[[dict], None]
Combine = Callable[[Tensor, Tensor, float], Tensor]  # (v_cond, v_uncond, cfg) -> guided velocity


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance, docs/method.md Eq. (6): v = v_uncond + cfg * (v_cond - v_uncond)."""
    return v_uncond + cfg * (v_cond - v_uncond)


def guided_velocity(model: Velocity, x: Tensor, t: Tensor, cond, uncond=None, cfg: float = 1.0,
                    combine: Combine = cfg_combine) -> Tensor:
    """The model's velocity under guidance ``cfg``; ``combine`` is the teacher's rule (plain CFG by default)."""
    v_cond = model(x, t, cond)
    if uncond is None or cfg == 1.0:
        return v_cond
    return combine(v_cond, model(x, t, uncond), cfg)


def evaluations_per_step(uncond, cfg: float) -> int:
    """Model evaluations of one guided step: 2 with CFG, 1 without."""
    return 1 if uncond is None or cfg == 1.0 else 2


def sample_euler(model: Velocity, x: Tensor, sigmas: Sequence[float], cond=None, *, uncond=None,
                 cfg: float = 1.0, combine: Combine = cfg_combine, callback: Callback | None = None,
                 step_offset: int = 0, phase: int = 0) -> Tensor:
    """Euler steps (docs/method.md Eq. (5)) from sigmas[0] to sigmas[-1]. ``callback`` gets one dict per step (k-diffusion keys:
    i, sigma, sigma_next, x, denoised) plus ``phase`` and ``velocity``."""
    for i, (t, t_next) in enumerate(zip(sigmas, sigmas[1:])):
        t_batch = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        v = guided_velocity(model, x, t_batch, cond, uncond, cfg, combine)
        if callback is not None:
            callback({"i": step_offset + i, "phase": phase, "sigma": float(t), "sigma_next": float(t_next),
                      "x": x, "velocity": v, "denoised": x0_from_velocity(x, t, v)})
        x = euler_step(x, t, t_next, v)
    return x


@dataclass
class PhasedSample:
    sample: Tensor
    boundary_states: list[tuple[float, Tensor]] = field(default_factory=list)  # (t_k, x_{t_k}), interior k
    nfe: int = 0  # model evaluations per sample, CFG counted


def phase_sigmas(schedule: PhaseSchedule, phase: int) -> tuple[float, ...]:
    """The timesteps of one phase, from its start boundary to its end boundary inclusive."""
    ends = (0, *schedule.boundary_step_indices)
    return schedule.timesteps[ends[phase]: ends[phase + 1] + 1]


def per_phase(value, phases: int, what: str = "values") -> tuple:
    """``value`` as one entry per phase: a single value (a callable, a number) is repeated for every phase."""
    if callable(value) or not isinstance(value, (list, tuple)):
        return (value,) * phases
    if len(value) != phases:
        raise ValueError(f"{len(value)} {what} for a schedule of {phases} phases")
    return tuple(value)


def sample_phased(experts: Velocity | Sequence[Velocity], x: Tensor, schedule: PhaseSchedule, cond=None, *,
                  uncond=None, cfg: float | Sequence[float] = 1.0, combine: Combine = cfg_combine,
                  callback: Callback | None = None) -> PhasedSample:
    """docs/method.md §2, Eq. (11): the student as a mixture of experts -- phase k's steps use expert k.

    ``experts`` is one callable per phase, or a single callable for all of them (a teacher: with a one-phase
    schedule this is the plain N-step sampler); ``cfg`` likewise one guidance scale, or one per phase (a
    phase handed back to the teacher runs at the teacher's CFG: ``teacher_takes_phases``). Returns the final
    sample, the state at every interior boundary and the NFE, each phase's CFG counted.
    """
    experts = per_phase(experts, schedule.num_phases, "experts")
    scales = per_phase(cfg, schedule.num_phases, "CFG scales")
    boundary_states, nfe = [], 0
    for k, (expert, scale) in enumerate(zip(experts, scales)):
        sigmas = phase_sigmas(schedule, k)
        x = sample_euler(expert, x, sigmas, cond, uncond=uncond, cfg=scale, combine=combine, callback=callback,
                         step_offset=(0, *schedule.boundary_step_indices)[k], phase=k)
        nfe += schedule.steps[k] * evaluations_per_step(uncond, scale)
        if k < schedule.num_phases - 1:
            boundary_states.append((sigmas[-1], x))
    return PhasedSample(x, boundary_states, nfe)


def teacher_takes_phases(schedule: PhaseSchedule, experts: Sequence[Velocity], cfg: float | Sequence[float],
                         teacher: Velocity, teacher_cfg: float, phases, teacher_steps: int
                         ) -> tuple[PhaseSchedule, list[Velocity], tuple[float, ...]]:
    """A student with the 0-based ``phases`` handed back to the teacher: (schedule, experts, CFG per phase) for
    ``sample_phased``. Phase k's expert becomes ``teacher`` (unguided velocity; the sampler guides it at
    ``teacher_cfg``), run with ``teacher_steps`` Euler steps spaced by Eq. (9) on the same interval
    [t_k, t_{k-1}]; the boundaries stay, so every other phase keeps its own timesteps and expert
    (docs/method.md §2, Eq. (11): which expert costs the student its quality)."""
    phases = set(phases)
    outside = sorted(k for k in phases if not 0 <= k < schedule.num_phases)
    if outside:
        raise ValueError(f"phase(s) {[k + 1 for k in outside]} outside the schedule's "
                         f"{schedule.num_phases} phase(s)")
    experts = per_phase(experts, schedule.num_phases, "experts")
    scales = per_phase(cfg, schedule.num_phases, "CFG scales")
    steps = tuple(teacher_steps if k in phases else n for k, n in enumerate(schedule.steps))
    return (PhaseSchedule(schedule.boundaries, steps, schedule.shift),
            [teacher if k in phases else e for k, e in enumerate(experts)],
            tuple(teacher_cfg if k in phases else c for k, c in enumerate(scales)))
