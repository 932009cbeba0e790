"""FLUX.1 (``FluxPipeline``). Matches the pipeline's __call__: latents are packed into 2x2 patches (tokens of
4 * C channels) with image ids for the rotary embedding, the timestep is t itself (the network scales it), and
the latents are unscaled as ``latents / scaling_factor + shift_factor``.

Guidance-distilled models (FLUX.1-dev, ``guidance_embeds``) take the guidance scale as an input and have no
unconditional branch: ``cfg`` is that input. When distilling, the real score runs at ``teacher_cfg`` and the
students and the fake score at ``student_cfg`` (so ``student_cfg: 1`` asks for a student of guidance input 1;
set it to the guidance the student should be sampled with). Models without it (FLUX.1-schnell) use true CFG
against the empty prompt, off by default (cfg 1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pdmd.teachers.diffusers_base import PackedLatentTeacher, pack_2x2, unpack_2x2

DEV_STEPS, DEV_GUIDANCE = 28, 3.5       # FluxPipeline's defaults (FLUX.1-dev)
SCHNELL_STEPS = 4                       # FLUX.1-schnell's model card


class FluxTeacher(PackedLatentTeacher):
    family = "flux"
    prompt_length = 512
    default_size = (1024, 1024)

    def __init__(self, pipe, *args, **kwargs):
        self.guidance_embedded = bool(pipe.transformer.config.guidance_embeds)
        self.default_steps = DEV_STEPS if self.guidance_embedded else SCHNELL_STEPS
        self.default_cfg = DEV_GUIDANCE if self.guidance_embedded else 1.0
        super().__init__(pipe, *args, **kwargs)

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict | None]:
        def encode(texts):
            embeds, pooled, _ = self.encode_with(
                lambda device: self.pipe.encode_prompt(prompt=texts, prompt_2=None, device=device,
                                                       max_sequence_length=self.prompt_length))
            return {"prompt_embeds": embeds, "pooled_projections": pooled}

        return encode(prompts), None if self.guidance_embedded else encode([""] * len(prompts))

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        _, _, height, width = x.shape
        out = self.run_tokens(pack_2x2(x), self.image_ids(height, width, x, cond), t, x, cond)
        return unpack_2x2(out.float(), height, width)

    def image_ids(self, height: int, width: int, x: Tensor, cond: dict) -> Tensor:
        """The rotary ids of a latent grid of ``height`` x ``width`` (packed 2x2), FluxPipeline's."""
        return self.pipe._prepare_latent_image_ids(x.shape[0], height // 2, width // 2, x.device,
                                                   cond["prompt_embeds"].dtype)

    def run_tokens(self, tokens: Tensor, image_ids: Tensor, t: Tensor, x: Tensor, cond: dict) -> Tensor:
        """The transformer on packed image ``tokens`` with their rotary ``image_ids``, at the batch's guidance
        (FluxPipeline's call); ``x`` gives the batch, device and timestep shape."""
        embeds = cond["prompt_embeds"]
        text_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype)
        guidance = cond.get("guidance")
        if self.guidance_embedded and guidance is None:  # a bare call: the teacher's own guidance
            guidance = torch.full((x.shape[0],), self.default_cfg, dtype=torch.float32, device=x.device)
        return self.model(hidden_states=tokens.to(self.dtype), timestep=self.timesteps(t, x), guidance=guidance,
                          pooled_projections=cond["pooled_projections"], encoder_hidden_states=embeds,
                          txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

    def decode(self, latents: Tensor) -> Tensor:
        config = self.pipe.vae.config
        return self.decode_vae(latents / config.scaling_factor + (config.shift_factor or 0.0))
