"""Qwen-Image (``QwenImagePipeline``). Matches the pipeline's __call__: latents packed into 2x2 patches, image
shapes for the rotary embedding, the timestep is t itself, the text mask of the Qwen2.5-VL encoder, and latents
unscaled as ``latents * latents_std + latents_mean`` before the (video-shaped) VAE.

Guidance is true CFG against a blank negative prompt, as the pipeline's ``true_cfg_scale``, with the
pipeline's rescaling of each token's guided prediction to the norm of its conditional one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pdmd.teachers.base import TeacherError
from pdmd.teachers.diffusers_base import PackedLatentTeacher, pack_2x2, unpack_2x2

NEGATIVE_PROMPT = " "  # what the Qwen-Image model card passes as negative_prompt


class QwenImageTeacher(PackedLatentTeacher):
    family = "qwen-image"
    prompt_length = 512
    default_size = (1024, 1024)
    default_steps = 50
    default_cfg = 4.0  # the pipeline's true_cfg_scale

    def __init__(self, pipe, *args, **kwargs):
        if pipe.transformer.config.guidance_embeds:
            raise TeacherError("Qwen-Image transformers with guidance_embeds are not supported")
        super().__init__(pipe, *args, **kwargs)

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        def encode(texts):
            embeds, mask = self.encode_with(
                lambda device: self.pipe.encode_prompt(prompt=texts, device=device,
                                                       max_sequence_length=self.prompt_length))
            return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

        return encode(prompts), encode([NEGATIVE_PROMPT] * len(prompts))

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, cfg: float) -> Tensor:
        height, width = v_cond.shape[-2:]
        cond, guided = pack_2x2(v_cond), pack_2x2(v_uncond + cfg * (v_cond - v_uncond))
        # per token (a 2x2 patch), as the pipeline: guided * |cond| / |guided|
        rescaled = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return unpack_2x2(rescaled, height, width)

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        _, _, height, width = x.shape
        return unpack_2x2(self.run_tokens(pack_2x2(x), [(1, height // 2, width // 2)], t, x, cond).float(),
                          height, width)

    def run_tokens(self, tokens: Tensor, grids: list[tuple], t: Tensor, x: Tensor, cond: dict) -> Tensor:
        """The transformer on packed image ``tokens`` made of the latent ``grids`` (frames, rows, columns), in
        order (QwenImagePipeline's call); ``x`` gives the batch and the timestep shape."""
        return self.model(hidden_states=tokens.to(self.dtype), timestep=self.timesteps(t, x).to(self.dtype),
                          guidance=None, encoder_hidden_states_mask=cond["prompt_embeds_mask"],
                          encoder_hidden_states=cond["prompt_embeds"], img_shapes=[grids] * x.shape[0],
                          return_dict=False)[0]

    def decode(self, latents: Tensor) -> Tensor:
        config = self.pipe.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(view).to(latents)
        std = torch.tensor(config.latents_std).view(view).to(latents)
        return self.decode_vae(latents[:, :, None] * std + mean)[:, :, 0]
