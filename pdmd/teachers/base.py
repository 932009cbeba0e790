"""The one interface every teacher implements; nothing downstream special-cases a particular teacher."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from pdmd.core.sampling import Callback, PhasedSample, Velocity, cfg_combine, per_phase, sample_phased
from pdmd.core.schedule import PhaseSchedule

# LoRA targets of a diffusers transformer: every attention projection (what published students adapt too)
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class TeacherError(ValueError):
    """A teacher that cannot be loaded or run; the message names the model and what to do about it."""


class Teacher(ABC):
    """A flow-matching model: prompts -> conditioning, velocity v(x_t, t, cond), latents -> images.

    ``model`` is the network LoRA experts attach to. ``velocity`` is unguided; classifier-free guidance is
    applied by the sampler from the ``(cond, uncond)`` pair that ``encode`` returns.

    Conditions beside the prompt (``conditions``: an image-to-video teacher's first frame, an editing teacher's
    image) are the family's alone: ``encode`` turns each row's image into the same per-row ``cond`` the prompts
    give, ``velocity`` reads it from there, and ``impose_conditions`` puts it into the finished sample where the
    pipeline does. The sampler and the trainer pass ``cond`` through untouched.
    """

    name: str
    model: nn.Module
    default_steps: int
    default_cfg: float
    default_shift: float
    default_prompts: tuple[str, ...] = ()  # what distillation runs on when a config lists no prompts
    family: str | None = None              # the diffusers model family ("sd3", "flux", "wan", "qwen-image")
    lora_prefix: str = "transformer"       # the diffusers LoRA key prefix of ``model`` (``<prefix>.<module>...``)
    lora_target_modules: tuple[str, ...] = ATTENTION_TARGETS  # LoRA targets when a config names none
    is_video: bool = False                 # decode gives (B, F, 3, H, W) frames instead of (B, 3, H, W)
    # A guidance-distilled teacher (FLUX.1-dev) takes guidance as a network input: encode_prompts gives no
    # unconditional branch and ``with_guidance`` puts the scale into the conditioning instead.
    guidance_embedded: bool = False
    # Two-network teachers (Wan 2.2 A14B, whose model card calls them its high- and low-noise "experts"; here
    # "expert" means a phase's LoRA only): ``model`` is an nn.ModuleDict of these networks and ``network_at(t)``
    # names the one that handles noise level t.
    network_names: tuple[str, ...] = ()
    # style LoRAs fused into the base while loading (pdmd.teachers.style_loras.StyleLora): base + style is the teacher
    style_loras: tuple = ()
    # what the teacher takes beside its prompts, one per prompt row: () text only, ("image",) an image per row
    conditions: tuple[str, ...] = ()
    # a family that cannot sample from prompts alone (Wan 2.1 I2V: its network's input holds the image's channels)
    needs_conditions = False
    # how many images one prompt may come with: several for an editing model that composes references
    # (Qwen-Image-Edit-Plus), whose encode_prompts_with_images then gets a tuple of images per prompt
    max_images_per_prompt = 1
    # a conditioned family whose task is the conditioned one (an editing model): a run given no condition images
    # draws them from its prompts with the teacher itself (pdmd.training.conditioning) instead of distilling text-only
    conditions_by_default = False

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> tuple[Any, Any]:
        """Conditioning for a batch of prompts and the matching unconditional branch."""

    def encode(self, prompts: list[str], images: list | None = None) -> tuple[Any, Any]:
        """``encode_prompts``, or with ``images`` (RGB PIL images read by ``pdmd.conditions.open_image``, one per
        prompt, or a tuple of them per prompt where ``max_images_per_prompt`` allows) the family's
        ``encode_prompts_with_images``; a text-only teacher refuses images. Rows encoded together take as many
        images each (their conditioning has one shape)."""
        if images is None:
            return self.encode_prompts(prompts)
        if "image" not in self.conditions:
            raise TeacherError(f"{self.name} is a text-only teacher: it takes no image")
        if len(images) != len(prompts):
            raise TeacherError(f"{len(images)} image(s) for {len(prompts)} prompt(s): give one image per prompt")
        rows = [tuple(item) if isinstance(item, (list, tuple)) else (item,) for item in images]
        counts = sorted({len(row) for row in rows})
        most = self.max_images_per_prompt
        if counts[0] < 1 or counts[-1] > most:
            allowed = "one image" if most == 1 else f"1 to {most} images"
            raise TeacherError(f"{self.name} takes {allowed} per prompt (got {counts[-1] or 'none'})")
        if len(counts) > 1:
            raise TeacherError(f"prompts sampled together need as many images each (got {counts})")
        return self.encode_prompts_with_images(prompts, rows if most > 1 else [row[0] for row in rows])

    def encode_prompts_with_images(self, prompts: list[str], images: list) -> tuple[Any, Any]:
        """The ``(cond, uncond)`` pair of prompts each with its image, for a teacher whose ``conditions`` name
        "image" (the family's whole encoding: an editing model may read the image in its prompt encoder too)."""
        raise NotImplementedError(f"{type(self).__name__} names 'image' in its conditions but encodes no image")

    def impose_conditions(self, x: Tensor, cond: Any) -> Tensor:
        """``x`` with what ``cond`` fixes in the sample itself put in place, as the pipeline does after its last
        step (Wan 2.2 TI2V: the first latent frame is the image's); unchanged where conditions only enter the
        network, as prompts do."""
        return x

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

    def network_at(self, t: float) -> str:
        raise TeacherError(f"{self.name} has a single network, no experts")

    def options(self) -> dict:
        """The load options (resolution, frames) a student needs to rebuild this teacher; see load_teacher."""
        return {}

    def with_guidance(self, velocity: Velocity, cfg: float) -> Velocity:
        """``velocity`` run at guidance ``cfg`` when guidance is a network input (``guidance_embedded``: the scale
        reaches the family's velocity as ``cond["guidance"]``, one per row); unchanged otherwise (CFG is then the
        sampler's ``(cond, uncond)`` pair)."""
        if not self.guidance_embedded:
            return velocity

        def guided(x: Tensor, t: Tensor, cond: dict) -> Tensor:
            guidance = torch.full((x.shape[0],), float(cfg), dtype=torch.float32, device=x.device)
            return velocity(x, t, {**cond, "guidance": guidance})
        return guided

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, cfg: float) -> Tensor:
        """How this teacher's pipeline mixes the guided pair: plain CFG unless a family says otherwise."""
        return cfg_combine(v_cond, v_uncond, cfg)

    def release_text_encoders(self) -> None:
        """Free the device memory of the prompt encoders once prompts are encoded (nothing to free here)."""

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        for network in (self.model.values() if isinstance(self.model, nn.ModuleDict) else [self.model]):
            if enabled:
                network.enable_gradient_checkpointing()
            else:
                network.disable_gradient_checkpointing()

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
               cfg: float | list[float] | None = None, experts: Velocity | list[Velocity] | None = None,
               callback: Callback | None = None, noise: Tensor | None = None,
               images: list | None = None) -> PhasedSample:
        """Teacher sampling by default (its own steps/shift/CFG); pass ``experts`` to sample a student, and
        ``cfg`` per phase where phases run at different guidance (pdmd.core.sampling.teacher_takes_phases).
        ``noise``: the x_1 to start from instead of ``self.noise(len(prompts), seed)`` -- several requests
        sampled as one batch, each row with its own seed's noise (ui.comparison). ``images``: one per prompt,
        for a teacher that takes them (``conditions``; see ``encode``)."""
        return self.sample_encoded(self.encode(list(prompts), images), len(prompts), seed, schedule, cfg, experts,
                                   callback, noise)

    @torch.no_grad()
    def sample_encoded(self, encoded: tuple[Any, Any], batch: int, seed: int = 0,
                       schedule: PhaseSchedule | None = None, cfg: float | list[float] | None = None,
                       experts: Velocity | list[Velocity] | None = None,
                       callback: Callback | None = None, noise: Tensor | None = None) -> PhasedSample:
        """``sample`` from ``batch`` prompts encoded earlier (``encode``'s pair): the trainer's sample grid,
        drawn after its text encoders were released, never touches them."""
        schedule = schedule or PhaseSchedule.uniform(self.default_steps, self.default_shift)
        cfg = self.default_cfg if cfg is None else cfg
        cond, uncond = encoded
        experts = experts or self.velocity
        if self.guidance_embedded:  # the scale is a network input, not a (cond, uncond) pair
            experts = [self.with_guidance(e, c) for e, c in zip(per_phase(experts, schedule.num_phases, "experts"),
                                                                per_phase(cfg, schedule.num_phases, "CFG scales"))]
        result = sample_phased(experts, self.noise(batch, seed) if noise is None else noise, schedule, cond,
                               uncond=uncond, cfg=cfg, combine=self.combine_guidance, callback=callback)
        return replace(result, sample=self.impose_conditions(result.sample, cond))
