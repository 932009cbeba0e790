"""FLUX.1 Kontext (``FluxKontextPipeline``): FLUX.1 that edits a reference image, given one per prompt.

Matches the pipeline's __call__ in diffusers 0.42 with an image: ``prepare_latents`` VAE-encodes the image once
(``_encode_vae_image``: the posterior's mode), normalises it as (z - shift_factor) * scaling_factor and packs it into
2x2 tokens as the noisy latent is packed, with the ids of its own latent grid but first coordinate 1 (the noisy
tokens' is 0). Every transformer call gets cat([noisy tokens, reference tokens]) with the ids alike and the velocity
is the output's noisy tokens. The timestep shift counts the noisy tokens alone, as the pipeline's does. Both
guidance branches carry the reference where there are two (true CFG of a checkpoint without guidance embedding);
nothing is written into the sample, so ``impose_conditions`` is the identity.

Without an image it is FLUX.1 (``needs_conditions`` stays False): the pipeline with ``image=None`` runs FluxPipeline's
loop, and so does this teacher. Its task is editing, though (``conditions_by_default``): a run given no
``condition_images`` draws its images with the teacher itself from the run's prompts (pdmd.training.conditioning)
and distils the editing student; ``condition_teacher: none`` distils it text-to-image instead.

Sizes differ from the pipeline's. Its __call__ rescales height x width to ``max_area`` (default 1024^2, the aspect
kept) and resizes the image (``_auto_resize``, on by default) to the nearest of its preferred Kontext resolutions,
stretching it -- without that to its own size floored to a multiple of 16 -- so its reference grid need not be the
output's. Here, as everywhere in pdmd, the image is covered and cropped to the teacher's height x width
(pdmd.conditions.fit): the reference has as many tokens as the output. The stock pipeline samples the same given an
image already at the teacher's size, ``_auto_resize=False`` and ``max_area=height * width``.

Guidance: FLUX.1 Kontext [dev] is guidance-distilled like FLUX.1-dev (see pdmd.teachers.flux); its default guidance
is 2.5, its model card's (and Black Forest Labs' reference sampler's), where the pipeline's __call__ keeps
FluxPipeline's 3.5; 28 steps, the pipeline's default, which the model card's example keeps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pdmd.conditions import fit
from pdmd.teachers.diffusers_base import pack_2x2, unpack_2x2
from pdmd.teachers.flux import FluxTeacher

KONTEXT_GUIDANCE = 2.5
# cond's entry for the reference image: its normalised latent, (B, C, h, w) float32, packed at each call
REFERENCE_LATENTS = "reference_latents"


class FluxKontextTeacher(FluxTeacher):
    conditions = ("image",)
    conditions_by_default = True

    def __init__(self, pipe, *args, **kwargs):
        super().__init__(pipe, *args, **kwargs)
        if self.guidance_embedded:
            self.default_cfg = KONTEXT_GUIDANCE

    def encode_prompts_with_images(self, prompts: list[str], images: list) -> tuple[dict, dict | None]:
        cond, uncond = self.encode_prompts(prompts)
        reference = {REFERENCE_LATENTS: self.reference_latents(images)}
        return {**cond, **reference}, None if uncond is None else {**uncond, **reference}

    def reference_latents(self, images: list) -> Tensor:
        """``_encode_vae_image`` of each image at the teacher's size in [-1, 1]: the posterior's mode, normalised."""
        pixels = torch.stack([fit(image, self.height, self.width) for image in images]) * 2 - 1
        config = self.pipe.vae.config
        return (self.encode_vae(pixels) - config.shift_factor) * config.scaling_factor

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        reference = cond.get(REFERENCE_LATENTS)
        if reference is None:  # text-only: FLUX.1
            return super().velocity(x, t, cond)
        _, _, height, width = x.shape
        reference_ids = self.image_ids(*reference.shape[2:], x, cond)
        reference_ids[:, 0] = 1  # the reference's place on the first rotary axis
        noisy = pack_2x2(x)
        out = self.run_tokens(torch.cat([noisy, pack_2x2(reference.to(x))], dim=1),
                              torch.cat([self.image_ids(height, width, x, cond), reference_ids]), t, x, cond)
        return unpack_2x2(out[:, :noisy.shape[1]].float(), height, width)
