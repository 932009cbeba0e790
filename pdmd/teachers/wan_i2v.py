"""Wan 2.1 image-to-video (``WanImageToVideoPipeline`` without ``expand_timesteps``), and Wan 2.2 I2V A14B, which
is the same pipeline class with ``transformer_2`` and ``boundary_ratio`` (the networks switch as in WanTeacher).

Matches the pipeline's __call__ in diffusers 0.42: ``prepare_latents`` VAE-encodes the first frame followed by
``num_frames - 1`` zero frames as one video (the posterior's mode), normalises it as (z - latents_mean) *
(1 / latents_std) and puts a frame mask before it on the channel axis -- 1 on the first frame, 0 after, the first
frame's mask repeated ``vae_scale_factor_temporal`` times, so 4 mask channels per latent frame -- and every network
input is ``cat([latents, mask, condition_latent], dim=1)`` (16 + 4 + 16 channels). Where the transformer has an
``image_dim`` (Wan 2.1; Wan 2.2 A14B has no image encoder) ``encode_image`` gives the CLIP vision tower's
penultimate hidden states as ``encoder_hidden_states_image``. Both go to the conditional and the unconditional
branch alike: the pipeline guides between prompt and negative prompt with the same image. Nothing is written into
the sample itself (only ``expand_timesteps`` overwrites the first latent frame), so ``impose_conditions`` is the
identity and every frame, the first included, is the network's.

The pipeline cannot run without an image, and neither can this teacher. Its ``last_image`` (first-last-frame
conditioning, Wan 2.1 FLF2V) is not supported. As everywhere here the VAE's image is cover-and-cropped to the
teacher's size where the pipeline stretches it; the CLIP encoder gets the image as given, as the pipeline's does
(its processor crops the centre square itself).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pdmd.conditions import fit
from pdmd.teachers.base import TeacherError
from pdmd.teachers.wan import WanTeacher

# cond's entries for the condition image: the mask and normalised latent as the pipeline concatenates them,
# (B, 4 + C, F, h, w) float32, and the CLIP hidden states (B, tokens, image_dim) where the transformer takes them
IMAGE_CONDITION, IMAGE_EMBEDS = "image_condition", "image_embeds"


class WanI2VTeacher(WanTeacher):
    needs_conditions = True

    def __init__(self, pipe, *args, **kwargs):
        super().__init__(pipe, *args, **kwargs)
        self.conditions = ("image",)
        # the pipeline's test: only a transformer with an image_dim takes image embeds (Wan 2.1 I2V)
        self.image_encoder = pipe.image_encoder if pipe.transformer.config.image_dim is not None else None
        if self.image_encoder is not None:
            self.image_encoder.eval().requires_grad_(False)
            if self.offload:
                self._offloaded.add(id(self.image_encoder))
            else:
                self._to_device([self.image_encoder], self.device)

    def encode(self, prompts: list[str], images: list | None = None) -> tuple[dict, dict]:
        if images is None:
            raise TeacherError(f"{self.name} is an image-to-video model and cannot run text-only: give one image "
                               "per prompt (--image, or condition_images in a train config)")
        return super().encode(prompts, images)

    def encode_prompts_with_images(self, prompts: list[str], images: list) -> tuple[dict, dict]:
        if self.pipe.config.expand_timesteps:  # TI2V-5B saved as this pipeline: WanTeacher's first-frame path
            return super().encode_prompts_with_images(prompts, images)
        cond, uncond = self.encode_prompts(prompts)
        image = {IMAGE_CONDITION: self.image_condition(images)}
        if self.image_encoder is not None:
            image[IMAGE_EMBEDS] = self.image_embeds(images)
        return {**cond, **image}, {**uncond, **image}

    def image_condition(self, images: list) -> Tensor:
        """``prepare_latents`` without ``last_image``: each image at the teacher's size in [-1, 1], then zero
        frames to ``num_frames``, encoded alone (a batch of full-length videos would not fit where one does),
        normalised, after its frame mask."""
        pixels = torch.stack([fit(image, self.height, self.width) for image in images]) * 2 - 1
        latents = []
        for frame in pixels:
            video = torch.cat([frame[:, None], frame.new_zeros(3, self.num_frames - 1, self.height, self.width)],
                              dim=1)
            latents.append(self.encode_vae(video[None]))
        latents = torch.cat(latents)
        mean, std = self._latent_statistics(latents)
        latents = (latents - mean) * (1.0 / std)
        batch, _, frames, height, width = latents.shape
        # the pipeline's pixel-frame mask (1, 0, 0, ...) with frame 0 repeated vae_scale_factor_temporal times,
        # folded into vae_scale_factor_temporal channels per latent frame: all ones on latent frame 0, zeros after
        mask = latents.new_zeros(batch, self.pipe.vae_scale_factor_temporal, frames, height, width)
        mask[:, :, 0] = 1
        return torch.cat([mask, latents], dim=1)

    def image_embeds(self, images: list) -> Tensor:
        """``encode_image``: the image processor's pixels through the CLIP vision tower, its hidden state before
        the last (``hidden_states[-2]``), in the transformer's dtype as the pipeline casts it."""
        with self._borrowed(self.image_encoder) as encoder:
            pixels = self.pipe.image_processor(images=images, return_tensors="pt").pixel_values
            hidden = encoder(pixel_values=pixels.to(next(encoder.parameters()).device),
                             output_hidden_states=True).hidden_states[-2]
        return self.on_model(hidden)

    def release_text_encoders(self) -> None:
        """The text encoders and the image encoder to the CPU: the run's images are encoded once, with its
        prompts."""
        if self.image_encoder is not None:
            self.image_encoder.to("cpu")
            self._offloaded.add(id(self.image_encoder))
        super().release_text_encoders()

    def _run(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: dict) -> Tensor:
        if IMAGE_CONDITION not in cond:  # expand_timesteps: WanTeacher's per-token timesteps
            return super()._run(network, x, timestep, cond)
        hidden = torch.cat([x, cond[IMAGE_CONDITION].to(x)], dim=1)
        return network(hidden_states=hidden.to(self.dtype), timestep=timestep,
                       encoder_hidden_states=cond["prompt_embeds"],
                       encoder_hidden_states_image=cond.get(IMAGE_EMBEDS), return_dict=False)[0].float()
