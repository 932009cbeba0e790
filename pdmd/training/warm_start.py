"""The regression warm start's data (docs/method.md §5, Eq. 23): the teacher's own trajectories, solved once per
run from noises and prompts drawn from the run's seed alone, so a resumed run solves the same pairs."""
from __future__ import annotations

import torch
from torch import Tensor

from pdmd.core import distill
from pdmd.teachers.base import Teacher
from pdmd.training.config import TrainConfig
from pdmd.training.steps import select


def teacher_pairs(config: TrainConfig, teacher: Teacher, real, teacher_cfg: float, cond, uncond, prompts: int,
                  device: torch.device) -> tuple[list[Tensor], object]:
    """``regression_pairs`` trajectories [x_1, x_{t_1}, ..., x_0] of the guided teacher ``real`` (in batch-size
    chunks) from prompts drawn among the first ``prompts`` rows of ``cond`` / ``uncond``, and their cond."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 999_983)
    index = torch.randint(prompts, (config.regression_pairs,), generator=generator)
    noise = torch.randn((config.regression_pairs, *teacher.latent_shape), generator=generator)
    chunks = [distill.teacher_states(real, config.schedule, noise[part].to(device), select(cond, index[part]),
                                     select(uncond, index[part]), teacher_cfg, combine=teacher.combine_guidance,
                                     steps_per_phase=config.regression_teacher_steps,
                                     impose=teacher.impose_conditions)
              for part in torch.arange(config.regression_pairs).split(config.batch_size)]
    return [torch.cat(states) for states in zip(*chunks)], select(cond, index)


def pair_batch(pairs: tuple[list[Tensor], object], phase: int, batch_size: int, generator: torch.Generator):
    """A batch of phase ``phase``'s pairs: the teacher's x_{t_{k-1}}, its x_{t_k}, and their cond."""
    states, cond = pairs
    index = torch.randint(len(states[0]), (batch_size,), generator=generator)
    start, target = (states[k][index.to(states[k].device)] for k in (phase, phase + 1))
    return start, target, select(cond, index)
