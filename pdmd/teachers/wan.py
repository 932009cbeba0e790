"""Wan 2.1 and 2.2 text-to-video (``WanPipeline``). Matches the pipeline's __call__: timestep t * 1000 (per
token for Wan 2.2 TI2V's ``expand_timesteps``), CFG on (negative "", prompt), latents (C, F, H, W) unscaled as
``latents * latents_std + latents_mean`` before the video VAE; decode gives frames.

Wan 2.2 A14B has two networks (its model card's "experts"): ``transformer`` for the high-noise steps
(t >= boundary_ratio) and ``transformer_2`` below. Here ``model`` is an nn.ModuleDict of both, so every LoRA role
(phase experts, fake score) gets an adapter in each, and ``velocity`` routes every sample of a batch by its own t, as the pipeline
routes each step. (The pipeline can guide the low-noise expert with a second scale, ``guidance_scale_2``; here
one CFG scale serves both.)

Wan 2.2 TI2V-5B (``expand_timesteps``) is image-to-video too: its checkpoint is what ``WanImageToVideoPipeline``
loads with a first-frame image, and given one per prompt (``encode(prompts, images)``) this teacher samples as
that pipeline does: the image's latent replaces the first latent frame of every network input and of the final
sample, and the first frame's tokens get timestep 0. Without an image it is text-to-video, as ``WanPipeline``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pdmd.conditions import fit
from pdmd.teachers.base import TeacherError
from pdmd.teachers.diffusers_base import DiffusersTeacher

HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"
FIRST_FRAME = "first_frame"  # cond's entry for the condition image: its normalised latent, (B, C, 1, h, w) float32


class WanTeacher(DiffusersTeacher):
    family = "wan"
    prompt_length = 512
    default_size = (480, 832)
    default_frames = 81
    default_cfg = 5.0
    is_video = True

    def __init__(self, pipe, *args, num_frames: int | None = None, **kwargs):
        self.num_frames = int(num_frames or self.default_frames)
        temporal = pipe.vae_scale_factor_temporal
        if (self.num_frames - 1) % temporal:
            raise TeacherError(f"num_frames = {self.num_frames}: Wan needs 1 + a multiple of {temporal} frames")
        self.boundary = pipe.config.boundary_ratio if pipe.transformer_2 is not None else None
        self.network_names = (HIGH_NOISE, LOW_NOISE) if self.boundary is not None else ()
        self.default_steps = 40 if self.network_names else 50  # the Wan 2.2 A14B / Wan 2.1 model cards
        self.conditions = ("image",) if pipe.config.expand_timesteps else ()  # TI2V-5B takes a first frame
        super().__init__(pipe, *args, **kwargs)

    def build_model(self) -> nn.Module:
        if self.network_names:
            return nn.ModuleDict({HIGH_NOISE: self.pipe.transformer, LOW_NOISE: self.pipe.transformer_2})
        return self.pipe.transformer

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size[1]

    def options(self) -> dict:
        return {**super().options(), "num_frames": self.num_frames}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        frames = (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        spatial = self.pipe.vae_scale_factor_spatial
        return self.pipe.vae.config.z_dim, frames, self.height // spatial, self.width // spatial

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        embeds, negative = self.encode_with(
            lambda device: self.pipe.encode_prompt(prompt=prompts, negative_prompt=[""] * len(prompts),
                                                   do_classifier_free_guidance=True, device=device,
                                                   max_sequence_length=self.prompt_length))
        return {"prompt_embeds": embeds}, {"prompt_embeds": negative}

    def encode_prompts_with_images(self, prompts: list[str], images: list) -> tuple[dict, dict]:
        """Both branches carry the row's first frame: the pipeline guides between prompt and negative prompt with
        the same image in the network input."""
        cond, uncond = self.encode_prompts(prompts)
        first_frame = self.first_frame_latents(images)
        return {**cond, FIRST_FRAME: first_frame}, {**uncond, FIRST_FRAME: first_frame}

    def first_frame_latents(self, images: list) -> Tensor:
        """``WanImageToVideoPipeline.prepare_latents`` with ``expand_timesteps``: each image at the teacher's size
        in [-1, 1] (cover-and-crop here, where the pipeline's preprocess stretches), VAE-encoded alone as a
        one-frame video (the posterior's mode) and normalised as (z - latents_mean) * (1 / latents_std)."""
        pixels = torch.stack([fit(image, self.height, self.width) for image in images]) * 2 - 1
        latents = self.encode_vae(pixels[:, :, None])
        mean, std = self._latent_statistics(latents)
        return (latents - mean) * (1.0 / std)

    def impose_conditions(self, x: Tensor, cond: dict) -> Tensor:
        """The pipeline's ``(1 - first_frame_mask) * condition + first_frame_mask * latents`` (mask 0 on the first
        latent frame only): applied to every network input, while the Euler state itself keeps its own first
        frame, and to the final sample -- both as ``WanImageToVideoPipeline.__call__`` does."""
        first_frame = cond.get(FIRST_FRAME)
        return x if first_frame is None else torch.cat([first_frame.to(x), x[:, :, 1:]], dim=2)

    def network_at(self, t: float) -> str:
        if not self.network_names:
            return super().network_at(t)
        return HIGH_NOISE if t * 1000 >= self.boundary * 1000 else LOW_NOISE

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        timestep = self.timesteps(t, x) * 1000
        if not self.network_names:
            return self._run(self.model, x, timestep, cond)
        high = timestep >= self.boundary * 1000  # the pipeline's test, in its units
        if bool(high.all()) or not bool(high.any()):
            return self._run(self.model[HIGH_NOISE if bool(high.all()) else LOW_NOISE], x, timestep, cond)
        out = torch.empty_like(x)
        for mask, name in ((high, HIGH_NOISE), (~high, LOW_NOISE)):
            rows = mask.nonzero().flatten()
            part = {k: v[rows] if isinstance(v, Tensor) else v for k, v in cond.items()}
            out[rows] = self._run(self.model[name], x[rows], timestep[rows], part)
        return out

    def _run(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: dict) -> Tensor:
        if self.pipe.config.expand_timesteps:  # Wan 2.2 TI2V: one timestep per token, frames x (H/2) x (W/2) --
            # the pipeline's first_frame_mask[0][0][:, ::2, ::2] * t flattened: 0 on the first frame's tokens when
            # an image fixes that frame; text-to-video's mask is all ones
            _, _, frames, height, width = x.shape
            mask = torch.ones(frames, (height + 1) // 2, (width + 1) // 2, device=x.device)
            if FIRST_FRAME in cond:
                mask[0] = 0
                x = self.impose_conditions(x, cond)
            timestep = timestep[:, None] * mask.flatten()
        return network(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                       return_dict=False)[0].float()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> frames (B, F, 3, H, W) in [0, 1]."""
        mean, std = self._latent_statistics(latents)
        return self.decode_vae(latents * std + mean).permute(0, 2, 1, 3, 4)

    def _latent_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's per-channel latents_mean and latents_std, shaped to broadcast over (B, C, F, H, W) ``like``."""
        config = self.pipe.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        return (torch.tensor(config.latents_mean).view(view).to(like),
                torch.tensor(config.latents_std).view(view).to(like))
