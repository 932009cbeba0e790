"""The one interface every teacher implements; nothing downstream special-cases a particular teacher."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from pdmd.sampling import Callback, PhasedSample, Velocity, sample_phased
from pdmd.schedule import PhaseSchedule


class Teacher(ABC):
    """A flow-matching model: prompts -> conditioning, velocity v(x_t, t, cond), latents -> images.

    ``model`` is the network LoRA experts attach to. ``velocity`` is unguided; classifier-free guidance is
    applied by the sampler from the ``(cond, uncond)`` pair that ``encode_prompts`` returns.
    """

    name: str
    model: nn.Module
    default_steps: int
    default_cfg: float
    default_shift: float
    default_prompts: tuple[str, ...] = ()  # what distillation runs on when a config lists no prompts

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> tuple[Any, Any]:
        """Conditioning for a batch of prompts and the matching unconditional branch."""

    @abstractmethod
    def velocity(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """v(x_t, t | cond) for a batch; ``t`` has shape (B,) in [0, 1]."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, without the batch dimension."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) with values in [0, 1]."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def noise(self, batch: int, seed: int) -> Tensor:
        """Seeded initial noise x_1, the same on every device for a given seed."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, *self.latent_shape), generator=generator)
        return x.to(device=self.device, dtype=next(self.model.parameters()).dtype)

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, schedule: PhaseSchedule | None = None,
               cfg: float | None = None, experts: Velocity | list[Velocity] | None = None,
               callback: Callback | None = None) -> PhasedSample:
        """Teacher sampling by default (its own steps/shift/CFG); pass ``experts`` to sample a student."""
        schedule = schedule or PhaseSchedule.uniform(self.default_steps, self.default_shift)
        cond, uncond = self.encode_prompts(list(prompts))
        return sample_phased(experts or self.velocity, self.noise(len(prompts), seed), schedule, cond,
                             uncond=uncond, cfg=self.default_cfg if cfg is None else cfg, callback=callback)
