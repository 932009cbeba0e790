"""FLUX.2 (``Flux2Pipeline``: FLUX.2 [dev]; ``Flux2KleinPipeline``: FLUX.2 [klein]). Written to match each
pipeline's ``__call__`` in diffusers 0.42:

- prompts are encoded by the pipeline's own ``encode_prompt`` (three hidden layers of its Mistral 3 / Qwen3 text
  encoder stacked per token, padded to 512 tokens); text ids are (0, 0, 0, l) per token;
- ``latent_shape`` is the grid the transformer sees: the VAE latent already 2x2-patchified and normalised,
  ``in_channels`` (128 on the real models) x H/16 x W/16; a token is one grid cell, in row-major order
  (``_pack_latents``), with position ids (0, h, w, 0) (``_prepare_latent_ids``); the pipeline draws its noise in
  this very shape, so a seed gives the same x_1 here and there;
- the timestep is t itself (the pipeline passes scheduler timestep / 1000 and the network multiplies by 1000);
- the shift is the scheduler's resolution- *and step-count*-dependent one: the pipelines compute
  mu = ``compute_empirical_mu(image tokens, num_inference_steps)`` and the scheduler's exponential time shift with
  it is the ordinary shift exp(mu); ``default_shift`` is the one at the teacher's default step count (another step
  count makes the pipeline use another mu: pass ``shift`` with the schedule to match it);
- decode undoes the latent normalisation with the VAE's BatchNorm statistics
  (``latents * sqrt(running_var + eps) + running_mean``), unpatchifies to 32 x H/8 x W/8 and runs the VAE decoder.

Guidance: FLUX.2 [dev] is guidance-distilled, the scale is a network input (``guidance``) and there is no
unconditional branch, as with FLUX.1-dev (``teacher_cfg`` is the real score's guidance, ``student_cfg`` the
students'). FLUX.2 [klein] passes ``guidance=None`` and uses true CFG against the empty prompt when
``guidance_scale > 1`` -- unless the pipeline's ``is_distilled`` is set (the 4-step klein-4B / klein-9B), which
ignores the scale: there is then no unconditional branch at all.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pdmd.teachers.base import ATTENTION_TARGETS
from pdmd.teachers.diffusers_base import DiffusersTeacher

# Flux2Pipeline / Flux2KleinPipeline defaults (num_inference_steps, guidance_scale)
PIPELINE_STEPS, PIPELINE_GUIDANCE = 50, 4.0
DISTILLED_STEPS = 4  # the step-distilled klein model cards (its pipeline ignores the guidance scale)
# FLUX.2's single-stream blocks fuse q, k, v (and the MLP input) into one projection and have no to_q/to_k/to_v:
# without it a LoRA on the attention projections would reach only the 8 (klein-4B: 5) double-stream blocks
FLUX2_TARGETS = ATTENTION_TARGETS + ("to_qkv_mlp_proj",)


def flux2_mu(image_tokens: int, steps: int) -> float:
    """The pipelines' resolution- and step-dependent mu (``compute_empirical_mu``, from BFL's sampling code)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    return compute_empirical_mu(image_seq_len=image_tokens, num_steps=steps)


def pack_grid(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C): one token per grid cell, row-major (Flux2Pipeline._pack_latents)."""
    return latents.flatten(2).transpose(1, 2)


def unpack_grid(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack_grid (what _unpack_latents_with_ids does for the ids _prepare_latent_ids gives)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class Flux2BaseTeacher(DiffusersTeacher):
    """What FLUX.2 [dev] and [klein] share: latents, ids, timestep, shift and decode (see the module doc)."""

    family = "flux2"
    prompt_length = 512  # the pipelines' max_sequence_length
    lora_target_modules = FLUX2_TARGETS
    negative_prompt: str | None = None  # the unconditional branch's prompt; None: the pipeline has none

    @property
    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor  # 128 * 8: 1024 on the real models
        return size, size

    @property
    def latent_shape(self) -> tuple[int, ...]:
        factor = self.size_multiple()  # VAE downsampling times the 2x2 patchify
        return self.model.config.in_channels, self.height // factor, self.width // factor

    def image_tokens(self) -> int:
        _, height, width = self.latent_shape
        return height * width

    def scheduler_shift(self) -> float:
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):  # the pipeline's mu is then unused: the static shift applies
            return float(config.get("shift") or 1.0)
        mu = flux2_mu(self.image_tokens(), self.default_steps)
        # the scheduler's time shift with sigma 1: exponential exp(mu) / (exp(mu) + 1/t - 1), linear mu / (...)
        return float(math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu)

    def encode_texts(self, texts: list[str]) -> dict:
        embeds, _ = self.encode_with(
            lambda device: self.pipe.encode_prompt(prompt=texts, device=device,
                                                   max_sequence_length=self.prompt_length))
        return {"prompt_embeds": embeds}  # the text ids depend on the length only: made in velocity

    def network_guidance(self, x: Tensor, cond: dict) -> Tensor | None:
        """The ``guidance`` input of the transformer call."""
        return None

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        height, width = x.shape[-2:]
        embeds = cond["prompt_embeds"]
        image_ids = self.pipe._prepare_latent_ids(x).to(x.device)
        text_ids = self.pipe._prepare_text_ids(embeds).to(x.device)
        # the pipeline hands the network its scheduler timestep (t * 1000) in the latents' dtype, divided by 1000
        timestep = (self.timesteps(t, x) * 1000).to(self.dtype) / 1000
        out = self.model(hidden_states=pack_grid(x).to(self.dtype), timestep=timestep,
                         guidance=self.network_guidance(x, cond), encoder_hidden_states=embeds, txt_ids=text_ids,
                         img_ids=image_ids, return_dict=False)[0]
        return unpack_grid(out.float(), height, width)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        unnormalised = latents * std.to(latents) + mean.to(latents)  # the VAE's own latents, still patchified
        return self.decode_vae(self.pipe._unpatchify_latents(unnormalised))


class Flux2Teacher(Flux2BaseTeacher):
    """FLUX.2 [dev] (``Flux2Pipeline``): guidance as a network input, no unconditional branch."""

    default_steps = PIPELINE_STEPS
    default_cfg = PIPELINE_GUIDANCE

    def __init__(self, pipe, *args, **kwargs):
        # Flux2Pipeline always passes its guidance_scale as the network's guidance; a transformer without a
        # guidance embedder ignores it, and then no guidance of any kind applies
        self.guidance_embedded = bool(pipe.transformer.config.guidance_embeds)
        if not self.guidance_embedded:
            self.default_cfg = 1.0
        super().__init__(pipe, *args, **kwargs)

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, None]:
        return self.encode_texts(prompts), None

    def network_guidance(self, x: Tensor, cond: dict) -> Tensor | None:
        guidance = cond.get("guidance")
        if guidance is None:  # a bare call: the teacher's own guidance, as the pipeline's default
            guidance = torch.full((x.shape[0],), self.default_cfg, dtype=torch.float32, device=x.device)
        return guidance


class Flux2KleinTeacher(Flux2BaseTeacher):
    """FLUX.2 [klein] (``Flux2KleinPipeline``): true CFG against "" (``guidance=None`` to the network); a
    step-distilled checkpoint (``is_distilled``) has no CFG and defaults to its model card's 4 steps."""

    def __init__(self, pipe, *args, **kwargs):
        self.step_distilled = bool(getattr(pipe.config, "is_distilled", False))
        self.default_steps = DISTILLED_STEPS if self.step_distilled else PIPELINE_STEPS
        self.default_cfg = 1.0 if self.step_distilled else PIPELINE_GUIDANCE
        self.negative_prompt = None if self.step_distilled else ""  # the pipeline's fixed negative prompt
        super().__init__(pipe, *args, **kwargs)

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict | None]:
        if self.negative_prompt is None:  # is_distilled: the pipeline ignores guidance_scale
            return self.encode_texts(prompts), None
        return self.encode_texts(prompts), self.encode_texts([self.negative_prompt] * len(prompts))

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, cfg: float) -> Tensor:
        if cfg <= 1.0:  # the pipeline runs CFG only for guidance_scale > 1
            return v_cond
        return super().combine_guidance(v_cond, v_uncond, cfg)
