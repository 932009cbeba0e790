"""Qwen-Image-Edit-2509 (``QwenImageEditPlusPipeline``): Qwen-Image that edits reference images, one or more per
prompt.

Matches the pipeline's __call__ in diffusers 0.42 (described for one image; each further one adds its "Picture k"
in the template and its grid of reference tokens, in order):

- the prompt goes through the pipeline's own ``encode_prompt`` together with the image at the condition size
  (``calculate_dimensions(CONDITION_IMAGE_SIZE, aspect)``, about 384x384, resized by the pipeline's image
  processor): the processor writes "Picture 1: <|vision_start|><|image_pad|><|vision_end|>" before the prompt in
  the chat template, its Qwen2-VL image processor decides how many ``<|image_pad|>`` tokens the vision tower's
  features fill, and the template's first ``prompt_template_encode_start_idx`` tokens are dropped. The negative
  prompt " " (the model card's) is encoded with the same image, so both guidance branches see it;
- the image at the VAE size is encoded (the posterior's mode), normalised as (z - latents_mean) / latents_std and
  packed into 2x2 tokens appended after the noisy ones; ``img_shapes`` lists the noisy grid, then the reference's;
  the velocity is the output's noisy tokens, and the timestep shift counts those alone, as the pipeline's does;
- true CFG with the per-token norm rescale, as QwenImageTeacher. Nothing is written into the sample itself.

Differences. The pipeline encodes one prompt per call; here each row is encoded as such a call and the rows are
padded (with the mask) to one length, ``prompt_length`` prompt tokens past the template and image tokens (a longer
prompt is refused), so rows encoded apart -- a run's condition images, a chunk at a time -- join row-wise; the mask
keeps the padding out of the attention (the pipeline's one unpadded prompt goes without one). The pipeline
VAE-encodes the image at a 1024^2 area in its own aspect (``VAE_IMAGE_SIZE``) whatever the output size, and makes
the output that size by default; here, as everywhere in pdmd, the image is covered and cropped to the teacher's
height x width (pdmd.conditions.fit), so the reference has as many tokens as the output, and the condition image is
the pipeline's condition size of that fitted image. The stock pipeline samples the same given an image already at
the teacher's size when ``VAE_IMAGE_SIZE`` is that size's area and its sides are multiples of 32 (a 1024x1024
teacher: the default). Several images per prompt (the pipeline's list, "Picture 1", "Picture 2"...: up to
MAX_IMAGES, the model card's range) come as a tuple per row, every row of a batch with as many.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pdmd.conditions import fit
from pdmd.teachers.base import TeacherError
from pdmd.teachers.diffusers_base import pack_2x2, unpack_2x2
from pdmd.teachers.qwen_image import NEGATIVE_PROMPT, QwenImageTeacher

# cond's entry for the reference images: their normalised latents, (B, images, C, h, w) float32, packed at each call
REFERENCE_LATENTS = "reference_latents"
MAX_IMAGES = 3  # per prompt: the 2509 model card's "1 to 3 input images"


class QwenImageEditPlusTeacher(QwenImageTeacher):
    conditions = ("image",)
    needs_conditions = True  # the pipeline cannot run without an image
    default_steps = 40       # the model card's; true_cfg_scale 4 as Qwen-Image
    max_images_per_prompt = MAX_IMAGES

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        raise TeacherError(f"{self.name} is an image-editing model and cannot run text-only: give one image per "
                           "prompt (--image, or condition_images in a train config)")

    def encode_prompts_with_images(self, prompts: list[str], images: list[tuple]) -> tuple[dict, dict]:
        """Each prompt with its image(s), "Picture 1", "Picture 2"... in the template and as many reference grids
        after the noisy tokens, in the order given."""
        fitted = [[fit(image, self.height, self.width) for image in row] for row in images]
        seen = [[self.condition_image(pixels) for pixels in row] for row in fitted]
        reference = {REFERENCE_LATENTS: torch.stack([self.reference_latents(row) for row in fitted])}
        rows = self.prompt_rows([*prompts, *[NEGATIVE_PROMPT] * len(prompts)], seen * 2)  # cond rows, then uncond
        cond, uncond = ({key: value[part] for key, value in rows.items()}
                        for part in (slice(len(prompts)), slice(len(prompts), None)))
        return {**cond, **reference}, {**uncond, **reference}

    def condition_size(self) -> tuple[int, int]:
        """(height, width) of the image the text encoder sees: the pipeline's condition size for the aspect."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
            CONDITION_IMAGE_SIZE,
            calculate_dimensions,
        )
        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, self.width / self.height)
        return height, width

    def condition_image(self, pixels: Tensor):
        """The fitted image (3, H, W), whole 255ths in [0, 1], back as the PIL image it was, resized as the pipeline
        resizes its condition image."""
        from PIL import Image

        image = Image.fromarray((pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        return self.pipe.image_processor.resize(image, *self.condition_size())

    def condition_image_tokens(self) -> int:
        """How many ``<|image_pad|>`` tokens the condition image becomes, from the text encoder's vision config: the
        Qwen2-VL image processor resizes it to multiples of patch x merge (``smart_resize``, default pixel bounds)
        and the vision tower merges merge x merge patches into one token. The planner counts these."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        vision = self.pipe.text_encoder.config.vision_config
        merge = vision.spatial_merge_size
        height, width = smart_resize(*self.condition_size(), factor=vision.patch_size * merge)
        return (height // vision.patch_size) * (width // vision.patch_size) // merge ** 2

    def prompt_rows(self, prompts: list[str], images: list[list]) -> dict:
        """Each prompt with its condition images through the pipeline's ``encode_prompt`` (one call per row, as the
        pipeline encodes its one prompt), padded to the template's tokens plus ``prompt_length`` with the mask."""
        def encode(device):
            # the empty prompt's length is the template's and the images' tokens alone (all images share a size,
            # every row has as many)
            texts = ["", *prompts]
            return tuple(self.pipe.encode_prompt(prompt=[text], image=list(row), device=device)[0]
                         for text, row in zip(texts, [images[0], *images]))

        template, *rows = self.encode_with(encode)
        length = template.shape[1] + self.prompt_length
        for prompt, row in zip(prompts, rows):
            if row.shape[1] > length:
                shown = repr(prompt[:40]) + ("..." if len(prompt) > 40 else "")
                raise TeacherError(f"{self.name}: the prompt {shown} has {row.shape[1] - template.shape[1]} tokens, "
                                   f"more than the {self.prompt_length} this teacher takes: shorten it")
        embeds = torch.cat([torch.cat([row, row.new_zeros(1, length - row.shape[1], row.shape[2])], dim=1)
                            for row in rows])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
        for k, row in enumerate(rows):
            mask[k, :row.shape[1]] = 1
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def reference_latents(self, fitted: list[Tensor]) -> Tensor:
        """``prepare_latents``' image latents before packing, (images, C, h, w): each image in [-1, 1] as a
        one-frame video, encoded alone (as the pipeline encodes each), normalised with the VAE's latents_mean /
        latents_std."""
        latents = torch.cat([self.encode_vae(pixels[None, :, None] * 2 - 1) for pixels in fitted])[:, :, 0]
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) / std

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        _, _, height, width = x.shape
        references = cond[REFERENCE_LATENTS].to(x).unbind(1)
        noisy = pack_2x2(x)
        grids = [(1, height // 2, width // 2), *[(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in references]]
        out = self.run_tokens(torch.cat([noisy, *map(pack_2x2, references)], dim=1), grids, t, x, cond)
        return unpack_2x2(out[:, :noisy.shape[1]].float(), height, width)
