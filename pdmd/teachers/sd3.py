"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MMDiT over VAE latents, two CLIP text encoders and
a T5. Matches the pipeline's __call__: timestep t * 1000, CFG on (negative "", prompt), latents unscaled as
``latents / scaling_factor + shift_factor`` before the VAE."""
from __future__ import annotations

from torch import Tensor

from pdmd.teachers.diffusers_base import DiffusersTeacher


class SD3Teacher(DiffusersTeacher):
    family = "sd3"
    prompt_length = 256
    default_steps = 28
    default_cfg = 7.0  # the pipeline's default; SD3.5 model cards use 3.5-4.5

    @property
    def default_size(self) -> tuple[int, int]:
        size = self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor
        return size, size

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    @property
    def latent_shape(self) -> tuple[int, ...]:
        factor = self.pipe.vae_scale_factor
        return self.model.config.in_channels, self.height // factor, self.width // factor

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        embeds, negative, pooled, negative_pooled = self.encode_with(
            lambda device: self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                   do_classifier_free_guidance=True, negative_prompt=[""] * len(prompts),
                                                   max_sequence_length=self.prompt_length))
        return ({"prompt_embeds": embeds, "pooled_projections": pooled},
                {"prompt_embeds": negative, "pooled_projections": negative_pooled})

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        return self.model(hidden_states=x.to(self.dtype), timestep=self.timesteps(t, x) * 1000,
                          encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled_projections"],
                          return_dict=False)[0].float()

    def decode(self, latents: Tensor) -> Tensor:
        config = self.pipe.vae.config
        return self.decode_vae(latents / config.scaling_factor + (config.shift_factor or 0.0))
