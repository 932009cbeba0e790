"""Update n of a run, as pure functions of (config, rank, n): its phase, its random generator, the generator's
learning rate there, and the prompt rows it conditions on. Nothing here depends on what ran before, so a resumed
run repeats an unbroken one (docs/method.md §5).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pdmd.training.config import TrainConfig


def phase_of(config: TrainConfig, step: int) -> tuple[int, int]:
    """(phase, update within the phase) of global generator update ``step``."""
    for phase, n in enumerate(config.updates_per_phase):
        if step < n:
            return phase, step
        step -= n
    return len(config.updates_per_phase) - 1, config.updates_per_phase[-1]


def step_generator(config: TrainConfig, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 1_000_003 + rank * 7_919 + step)


def exit_generator(config: TrainConfig, step: int) -> torch.Generator:
    """SGTS's exit steps of update ``step``: they set how many (sharded) forwards a rollout runs, so they are drawn
    from (seed, update) alone, alike on every rank (distill.rollout); + 2**32 keeps this stream apart from every
    rank's step_generator."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + 2**32 + step)


def set_generator_rate(config: TrainConfig, optimizer, phase: int, update: int) -> None:
    """``lr_decay: linear``: the generator's rate falls to zero over each phase (set from the step alone, so a
    resumed run has the same rate); ``constant`` leaves it as built."""
    if config.lr_decay != "linear":
        return
    rate = config.lr_generator * (1 - update / config.updates_per_phase[phase])
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):  # torchao's 8-bit AdamW keeps it a tensor, filled in place
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def select(cond, index: Tensor | slice):
    """Rows ``index`` (indices, or a slice: views) of a conditioning batch (a tensor, or a dict / tuple of them)."""
    if isinstance(cond, Tensor):
        return cond[index if isinstance(index, slice) else index.to(cond.device)]
    if isinstance(cond, dict):
        return {k: select(v, index) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(select(v, index) for v in cond)
    return cond
