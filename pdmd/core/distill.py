"""The distillation objective shared by every method and every model (the 2-D lab and image teachers).

One code path, so comparisons are fair (docs/method.md §6; the objective is §3-§5):
- ``dmd``          one step from noise to x_0;
- ``dmd-sgts``     4 steps, stochastic gradient truncation (grad only through a random exit step);
- ``phased``       2 phases x 2 steps, one expert per phase, trained in order (Phased DMD);
- ``phased-sgts``  the same phases with SGTS inside each phase.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function  # bench-train --profile's labels

from pdmd.core import rectified_flow as rf
from pdmd.core import sampling
from pdmd.core.sampling import Combine, Velocity, cfg_combine, guided_velocity, phase_sigmas, sample_euler
from pdmd.core.schedule import PhaseSchedule, preset

# x, cond -> x with what the conditions fix in a sample put in place (Teacher.impose_conditions; docs/method.md §6)
Impose = Callable[[Tensor, Any], Tensor]


def unconditioned(x: Tensor, cond=None) -> Tensor:
    """The rule of a text-only teacher: nothing in a sample is fixed."""
    return x


@dataclass(frozen=True)
class Method:
    name: str
    schedule: PhaseSchedule
    sgts: bool  # stochastic gradient truncation


METHODS: dict[str, Method] = {
    "dmd": Method("dmd", PhaseSchedule.uniform(1), sgts=False),
    "dmd-sgts": Method("dmd-sgts", PhaseSchedule.uniform(4), sgts=True),
    "phased": Method("phased", preset("paper-2x2"), sgts=False),
    "phased-sgts": Method("phased-sgts", preset("paper-2x2"), sgts=True),
}


def get_method(name: str, schedule: PhaseSchedule | None = None) -> Method:
    """A method by name; ``schedule`` overrides its default steps (phased methods keep their phases)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    method = METHODS[name]
    if schedule is None:
        return method
    if not name.startswith("phased") and schedule.num_phases != 1:
        raise ValueError(f"method {name!r} is single-phase but the schedule has {schedule.num_phases} phases")
    return Method(name, schedule, method.sgts)


def rollout(experts: list[Velocity], phase: int, schedule: PhaseSchedule, noise: Tensor, cond=None,
            *, sgts: bool = False, generator: torch.Generator | None = None,
            impose: Impose = unconditioned) -> tuple[Tensor, float]:
    """docs/method.md §5, Eq. (21): back-simulation: noise -> frozen experts 1..k-1 (no grad) -> expert k's own steps -> x_s, s = t_k.

    With SGTS (§5, Eq. (22)) a random exit step j of the phase is drawn from ``generator``: the steps before it run
    without grad and step j's prediction is projected straight to the phase end, so only step j carries gradient.
    Without SGTS the gradient flows through every step of the phase. ``impose`` is applied at every phase
    boundary: what the conditions fix (a first frame) is the condition there, and x_s carries no gradient in it.

    The exit step is the only draw here (the noise is given), and it shapes the graph: j + 1 forwards of expert k.
    Under FSDP each forward is a collective every rank must join, so the trainer passes a generator seeded by
    (seed, update) alone, the same on every rank, and keeps its per-rank one for the noise.
    """
    x = noise
    with torch.no_grad():
        for k in range(phase):
            x = impose(sample_euler(experts[k], x, phase_sigmas(schedule, k), cond), cond)
    sigmas = phase_sigmas(schedule, phase)
    s = sigmas[-1]
    if not sgts:
        return impose(sample_euler(experts[phase], x, sigmas, cond), cond), s
    exit_step = int(torch.randint(len(sigmas) - 1, (1,), generator=generator))
    with torch.no_grad():
        x = sample_euler(experts[phase], x, sigmas[: exit_step + 1], cond)
    t = sigmas[exit_step]
    t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    return impose(rf.euler_step(x, t, s, experts[phase](x, t_batch, cond)), cond), s


def renoise(x_s: Tensor, s: float, shift: float = 1.0, generator: torch.Generator | None = None):
    """docs/method.md §4, Eqs. (16)-(17): t ~ T(s, 1) (nested interval) and x_t = alpha_{t|s} x_s + sigma_{t|s} eps."""
    t = rf.sample_nested_timesteps(s, x_s.shape[0], shift, generator=generator).to(x_s.device, x_s.dtype)
    eps = torch.randn(x_s.shape, generator=generator).to(x_s.device, x_s.dtype)
    return t, eps, rf.subinterval_transition(x_s, eps, s, t)


def generator_loss(x_s: Tensor, s: float, teacher: Velocity, fake: Velocity, cond=None, uncond=None,
                   cfg: float = 1.0, *, combine: Combine = cfg_combine, shift: float = 1.0, gradient: str = "x0",
                   generator: torch.Generator | None = None,
                   impose: Impose = unconditioned) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/method.md §3, Eqs. (12)-(14): the DMD loss of phase k, whose gradient w.r.t. x_s is the
    distribution-matching direction, and its diagnostics (as DMD2 logs them): the DMD gradient's norm per
    sample and the real/fake gap in x0-prediction, which shrinks as the generator matches the teacher.

    The teacher uses CFG (by its own ``combine`` rule), the fake score none (Eq. (15)). ``gradient`` picks the
    velocity form (w_{t|s}) or the DMD2 x0-normalised form. ``impose`` puts the conditions into both x0
    estimates, so in the x0 form the region they fix adds nothing to the gradient, its normaliser or the score gap.
    """
    if gradient not in ("x0", "velocity"):
        raise ValueError(f"unknown DMD gradient form {gradient!r}; use 'x0' or 'velocity'")
    t, _, x_t = renoise(x_s.detach(), s, shift, generator)
    with torch.no_grad():
        with record_function("generator/real score"):
            v_real = guided_velocity(teacher, x_t, t, cond, uncond, cfg, combine)
        with record_function("generator/fake score"):
            v_fake = fake(x_t, t, cond)
        x0_real, x0_fake = (impose(rf.x0_from_velocity(x_t, t, v), cond) for v in (v_real, v_fake))
        if gradient == "velocity":
            grad = rf.dmd_gradient_velocity(v_real, v_fake, s, t)
        else:
            grad = rf.dmd_gradient_x0(x0_real, x0_fake, x_s)
        # detached tensors, not floats: reading them syncs the device, so the caller decides when (and the
        # memory planner runs this on the meta device, where nothing can be read)
        diagnostics = {"dmd_gradient_norm": grad.flatten(1).norm(dim=1).mean(),
                       "score_gap": (x0_real - x0_fake).abs().mean()}
    return rf.dmd_loss(x_s, grad), diagnostics


def fake_loss(fake: Velocity, x_s: Tensor, s: float, cond=None, *, shift: float = 1.0,
              generator: torch.Generator | None = None, impose: Impose = unconditioned) -> Tensor:
    """docs/method.md §4: score matching within the subinterval (s, 1) on generated x_s -- the clamped loss,
    Eq. (20) (paper Eq. 13) -- over the entries of the sample the conditions leave to the network (§6)."""
    x_s = x_s.detach()
    t, eps, x_t = renoise(x_s, s, shift, generator)
    return rf.subinterval_loss(fake(x_t, t, cond), x_s, eps, s, t, mask=free_entries(x_s, cond, impose))


def free_entries(x: Tensor, cond, impose: Impose) -> Tensor | None:
    """1 where a sample is the network's, 0 where the conditions fix it (``impose`` puts the same there whatever
    ``x`` holds); None for a text-only rule (``unconditioned``), which fixes nothing. No value is read back, so a
    training step waits on no device."""
    if impose is unconditioned or x.is_meta:  # the planner's meta tensors hold no values to compare
        return None
    return (impose(torch.zeros_like(x), cond) != impose(torch.ones_like(x), cond)).to(x.dtype)


def teacher_states(teacher: Velocity, schedule: PhaseSchedule, noise: Tensor, cond=None, uncond=None,
                   cfg: float = 1.0, *, combine: Combine = cfg_combine, steps_per_phase: int = 6,
                   impose: Impose = unconditioned) -> list[Tensor]:
    """The teacher's own ODE solution from ``noise`` at every boundary of ``schedule``: [x_1 (the noise),
    x_{t_1}, ..., x_0], each phase solved with ``steps_per_phase`` guided Euler steps (spaced by Eq. (9)):
    the paired targets of ``regression_loss``, each boundary with the conditions imposed as a rollout's are."""
    phases = range(schedule.num_phases)
    steps, experts, scales = sampling.teacher_takes_phases(schedule, [teacher] * len(phases), cfg, teacher, cfg,
                                                           phases, steps_per_phase)
    out = sampling.sample_phased(experts, noise, steps, cond, uncond=uncond, cfg=scales, combine=combine)
    return [noise, *(impose(x, cond) for _, x in out.boundary_states), impose(out.sample, cond)]


def regression_loss(experts: list[Velocity], phase: int, schedule: PhaseSchedule, start: Tensor, target: Tensor,
                    cond=None, *, impose: Impose = unconditioned) -> Tensor:
    """DMD's regression loss on paired teacher trajectories (Yin et al. 2024, Eq. 6; mean squared error where
    they use LPIPS), per phase: expert k's own steps from the teacher's x_{t_{k-1}} should land on the teacher's
    x_{t_k}. A warm start: it points each expert at the teacher's mapping before the DMD updates sharpen it."""
    x = impose(sample_euler(experts[phase], start, phase_sigmas(schedule, phase), cond), cond)
    return (x - target).square().mean()
