"""Z-Image (``ZImagePipeline``), written to match the pipeline's ``__call__`` in diffusers 0.42:

- prompts go through the pipeline's own ``encode_prompt`` (the Qwen3 chat template, the second-to-last hidden
  state, each prompt's padding tokens dropped), negative prompt ``""`` as the pipeline's default; the
  variable-length embeddings are kept here as one zero-padded tensor plus its mask, so a batch's rows can be
  selected like every other family's, and unpadded again before the transformer sees them;
- latents are (C, H/8, W/8) unpacked; the transformer takes a list of (C, 1, H, W) latents (a frame axis of one)
  and patchifies them itself;
- the network's time runs the other way: the pipeline passes ``(1000 - 1000 t) / 1000`` (t = 1 is noise for the
  scheduler, 0 for the network) and steps with the negated output, so ``velocity`` is ``-model(x, 1 - t)``;
- the shift is the scheduler's (static ``shift``, 3.0 for Z-Image-Turbo; a dynamic one from the image tokens);
- decode as ``latents / scaling_factor + shift_factor`` (the FLUX VAE).

Guidance: the pipeline's ``guidance_scale`` s mixes ``pos + s * (pos - neg)``, which is ordinary CFG at
``cfg = 1 + s``: this teacher's ``cfg`` is that 1 + s (cfg 1 = guidance_scale 0 = one evaluation, as the pipeline
skips the negative branch then), and ``combine_guidance`` uses the pipeline's own expression, so samples agree to
the bit. Its two options off by default are not reproduced: ``cfg_normalization`` (clip each sample's guided
norm to that factor times the conditional one) and ``cfg_truncation`` (guidance 0 once ``1 - t`` exceeds it; the
default 1.0 never triggers). A ``guidance_scale`` below 0 (cfg < 1) turns guidance off in the pipeline; here it
would extrapolate.

Z-Image-Turbo is guidance-distilled and its model card samples at ``guidance_scale=0.0`` in about 8 steps; nothing
in its config says so, so a checkpoint whose name says "Turbo" gets those defaults, any other the pipeline's own
(50 steps, guidance_scale 5).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pdmd.teachers.diffusers_base import DiffusersTeacher

NEGATIVE_PROMPT = ""        # ZImagePipeline.encode_prompt's default negative prompt
PIPELINE_STEPS, PIPELINE_GUIDANCE_SCALE = 50, 5.0   # ZImagePipeline.__call__'s defaults
TURBO_STEPS = 8             # Z-Image-Turbo: 8 NFEs (the diffusers example's num_inference_steps), guidance_scale 0
TRAIN_TIMESTEPS = 1000      # the scheduler's num_train_timesteps, in which the pipeline writes the network's time


def cfg_of_guidance_scale(guidance_scale: float) -> float:
    """Our CFG scale for the pipeline's ``guidance_scale`` s: ``pos + s (pos - neg) = neg + (1 + s)(pos - neg)``."""
    return 1.0 + float(guidance_scale)


def pad_captions(captions: list[Tensor]) -> dict:
    """The pipeline's list of (L_i, D) prompt embeddings as ``prompt_embeds`` (B, max L_i, D), zero-padded, and
    ``prompt_mask`` (B, max L_i), true on each prompt's own tokens."""
    longest = max(len(c) for c in captions)
    embeds = captions[0].new_zeros(len(captions), longest, captions[0].shape[-1])
    mask = torch.zeros(len(captions), longest, dtype=torch.bool, device=captions[0].device)
    for row, caption in enumerate(captions):
        embeds[row, : len(caption)] = caption
        mask[row, : len(caption)] = True
    return {"prompt_embeds": embeds, "prompt_mask": mask}


def unpad_captions(cond: dict) -> list[Tensor]:
    """Inverse of pad_captions: the list the transformer takes. On the meta device (the memory planner) values
    cannot be read, and the planner's mask is all true anyway: every row is taken whole."""
    embeds, mask = cond["prompt_embeds"], cond["prompt_mask"]
    if embeds.is_meta:
        return list(embeds.unbind(0))
    return [row[keep] for row, keep in zip(embeds, mask)]


class ZImageTeacher(DiffusersTeacher):
    family = "z-image"
    prompt_length = 512          # __call__'s max_sequence_length
    default_size = (1024, 1024)  # __call__'s height and width when none are given

    def __init__(self, pipe, source: str, *args, **kwargs):
        turbo = "turbo" in str(source).lower()
        self.default_steps = TURBO_STEPS if turbo else PIPELINE_STEPS
        self.default_cfg = cfg_of_guidance_scale(0.0 if turbo else PIPELINE_GUIDANCE_SCALE)
        super().__init__(pipe, source, *args, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        factor = self.pipe.vae_scale_factor
        return self.model.config.in_channels, self.height // factor, self.width // factor

    def image_tokens(self) -> int:
        """The pipeline's image_seq_len for a dynamic shift: 2x2 patches of the latent."""
        _, height, width = self.latent_shape
        return (height // 2) * (width // 2)

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        # encode_prompt writes the chat template into the list it is given: hand it copies
        positive, negative = self.encode_with(
            lambda device: self.pipe.encode_prompt(prompt=list(prompts), device=device,
                                                   do_classifier_free_guidance=True,
                                                   negative_prompt=[NEGATIVE_PROMPT] * len(prompts),
                                                   max_sequence_length=self.prompt_length))
        return ({k: self.on_model(v) for k, v in pad_captions(positive).items()},
                {k: self.on_model(v) for k, v in pad_captions(negative).items()})

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, cfg: float) -> Tensor:
        # the pipeline's own expression, pos + s * (pos - neg) with s = cfg - 1 (negating both sides is exact)
        return v_cond + (cfg - 1.0) * (v_cond - v_uncond)

    def network_time(self, t: Tensor, x: Tensor) -> Tensor:
        """The time the pipeline gives the network, computed as it does: (1000 - 1000 t) / 1000, float32."""
        timestep = self.timesteps(t, x) * TRAIN_TIMESTEPS
        return (TRAIN_TIMESTEPS - timestep) / TRAIN_TIMESTEPS

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        latents = list(x.to(self.dtype).unsqueeze(2).unbind(0))  # one (C, 1, H, W) per sample, as the pipeline
        out = self.model(latents, self.network_time(t, x), unpad_captions(cond), return_dict=False)[0]
        return -torch.stack([sample.float() for sample in out]).squeeze(2)

    def decode(self, latents: Tensor) -> Tensor:
        config = self.pipe.vae.config
        return self.decode_vae(latents / config.scaling_factor + (config.shift_factor or 0.0))
