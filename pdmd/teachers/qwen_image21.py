"""Qwen-Image 2.1 text-to-image (``QwenImage21Pipeline``), written to match the pipeline's ``__call__`` in diffusers
0.42 without condition images:

- prompts go through the pipeline's own ``encode_prompt``: its raw chat-template string (system turn "Comprehend
  and analyze the provided prompt."), the Qwen3-VL text model's last decoder layer before its final norm (the
  pipeline's forward hook), the system turn's tokens and each prompt's padding dropped, the embeddings zero-padded
  to the longest prompt; encode_prompt's mask (None where nothing is padded) is kept as a boolean mask, so a batch's
  rows can be selected like every other family's;
- latents are the transformer's unpatched grid, (``in_channels``, H/16, W/16): 64 channels on the real model, one
  token per latent pixel in row-major order (``_pack_latents``); the pipeline draws its noise as (B, 1, C, h, w), the
  same values, so a seed gives the same x_1 here and there;
- the transformer sees the text tokens and then the image's, with ``img_mask`` marking one slot per 2x2 group of
  image tokens after the text (the pipeline's ``append_target_slots``); columns that are padding in every row of a
  batch are dropped and an all-true mask passed as None, so a prompt sees what the pipeline gives it alone (in a
  batch of prompts of different lengths, what the pipeline gives that batch);
- the timestep is the scheduler's t * 1000 in the latents' dtype, divided by 1000; the output's image tokens are
  the velocity;
- the shift is the scheduler's resolution-dependent one: exp(mu) with mu = ``calculate_shift`` of the image's
  token count (H/16 * W/16), the scheduler's exponential time shift;
- decode as ``latents * latents_std + latents_mean`` through the (video-shaped) Qwen-Image 2.1 VAE, which decodes
  RGBA: ``decode`` gives its RGB channels (the alpha channel is dropped, not composited).

Guidance: true CFG as the pipeline's ``true_cfg_scale`` s, ``neg + s (cond - neg)`` with no norm rescaling (unlike
Qwen-Image), on only for s > 1 (s = 1, the pipeline's default and Qwen's recommendation, is one evaluation a step). The
pipeline has no default negative prompt; the unconditional branch here is " " (what the pipeline encodes for an
empty prompt).

KV cache: the pipeline caches the text tokens' keys and values after the first step (``use_kv_cache=True``), exact
because ``causal_condition`` modulates text tokens at t = 0 and block-causal attention keeps them from attending
to the image: they do not change between steps. Here every call runs the whole sequence, which gives the cached
pipeline's result; for a phased student it is the only correct reading, since each phase's LoRA changes the text
tokens' keys and values (the model card's snippet passes ``use_kv_cache=False`` to the pipeline for that reason).

Not reproduced: condition images (image-conditioned generation and editing); the scheduler's ``shift_terminal``
(0.02 on the real checkpoint: the pipeline stretches its shifted sigmas so the last one before 0 is 0.02; a phase
schedule here ends its last step at 0 from the shifted grid alone, as for Qwen-Image); a checkpoint's own
``sample_sigmas`` grid (Qwen-Image 2.1 Turbo): its step count becomes the default, its values are not used.

The real checkpoint's processor (``Qwen3VLProcessor``) holds a video processor that transformers builds only with
torchvision installed: without it ``QwenImage21Pipeline.from_pretrained`` fails to load the pipeline (the tiny
test pipeline, pdmd/teachers/tiny.py, holds a processor without one).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from pdmd.teachers.diffusers_base import DiffusersTeacher
from pdmd.teachers.flux2 import pack_grid, unpack_grid  # the same row-major flatten as QwenImage21Pipeline's

NEGATIVE_PROMPT = " "      # the pipeline turns an empty prompt into " " (Qwen has no bos token)
PIPELINE_STEPS = 40        # QwenImage21Pipeline.__call__'s num_inference_steps (what Qwen recommends)
PIPELINE_CFG = 1.0         # and its true_cfg_scale: no guidance
TRAIN_TIMESTEPS = 1000     # the scheduler's num_train_timesteps: the pipeline passes timestep / 1000
TOKENS_PER_SLOT = 4        # one img_mask slot stands for a 2x2 group of latent tokens


def batch_text(cond: dict) -> tuple[Tensor, Tensor | None]:
    """(embeddings, mask) as the pipeline hands them to the transformer for these rows: padded to the longest of
    them, the mask None where nothing is padded (encode_prompt's rule). On the meta device (the memory planner)
    values cannot be read; its mask is all true: the rows are taken whole."""
    embeds, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
    if embeds.is_meta:
        return embeds, None
    longest = int(mask.sum(1).max())
    embeds, mask = embeds[:, :longest], mask[:, :longest]
    return embeds, (None if bool(mask.all()) else mask)


def image_slots(batch: int, text_tokens: int, image_tokens: int, device) -> Tensor:
    """The transformer's ``img_mask`` for text-to-image: false on the text, true on one slot per 2x2 group of image
    tokens appended after it (what the pipeline makes of encode_prompt's all-false image_pad_mask)."""
    mask = torch.zeros(batch, text_tokens + image_tokens // TOKENS_PER_SLOT, dtype=torch.bool, device=device)
    mask[:, text_tokens:] = True
    return mask


class QwenImage21Teacher(DiffusersTeacher):
    family = "qwen-image21"
    # the pipeline does not cap a prompt's tokens; pdmd caps prompts at 500 characters (pdmd.limits), which the
    # memory planner counts as this many tokens of the Qwen3-VL encoder
    prompt_length = 512
    default_size = (1024, 1024)   # __call__'s output_resolution when no height and width are given
    default_cfg = PIPELINE_CFG

    def __init__(self, pipe, *args, **kwargs):
        sigmas = pipe.config.get("sample_sigmas")
        self.default_steps = len(sigmas) if sigmas else PIPELINE_STEPS  # a checkpoint's own grid sets its steps
        super().__init__(pipe, *args, **kwargs)
        if self.device.type == "meta":
            _layout_to_meta_in_blocks(self.model)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        factor = self.pipe.vae_scale_factor  # 16: one latent pixel per 16x16 image pixels, no patching
        return self.model.config.in_channels, self.height // factor, self.width // factor

    def image_tokens(self) -> int:
        """The pipeline's image_seq_len for calculate_shift: latents.shape[1], one token per latent pixel."""
        _, height, width = self.latent_shape
        return height * width

    def encode_texts(self, texts: list[str]) -> dict:
        # its image_pad_mask is all false without condition images (the processor refuses a prompt holding the
        # image placeholder token when no image comes with it): velocity makes the transformer's img_mask itself
        embeds, mask, _ = self.encode_with(lambda device: self.pipe.encode_prompt(prompt=list(texts), device=device))
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        # the unconditional branch even at the pipeline's default of no guidance: a run's teacher CFG may guide
        negative = self.encode_texts([NEGATIVE_PROMPT])
        return self.encode_texts(prompts), {k: v.expand(len(prompts), *v.shape[1:]) for k, v in negative.items()}

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, cfg: float) -> Tensor:
        if cfg <= 1.0:  # the pipeline runs true CFG only for true_cfg_scale > 1
            return v_cond
        return super().combine_guidance(v_cond, v_uncond, cfg)  # neg + s (cond - neg): the pipeline's own

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        batch, _, height, width = x.shape
        embeds, mask = batch_text(cond)
        # the layout is read by value (repeat_interleave, tolist): on the meta device it is made on the CPU
        slots = image_slots(batch, embeds.shape[1], height * width, "cpu" if x.is_meta else x.device)
        # the pipeline's timestep: t * 1000 in the latents' dtype, divided by 1000
        timestep = (self.timesteps(t, x) * TRAIN_TIMESTEPS).to(self.dtype) / TRAIN_TIMESTEPS
        call = dict(hidden_states=pack_grid(x).to(self.dtype), timestep=timestep, encoder_hidden_states=embeds,
                    encoder_hidden_states_mask=mask, img_shapes=[[(1, height, width)]] * batch, img_mask=slots,
                    return_dict=False)
        if x.is_meta:
            with LayoutOnMeta():
                out = self.model(**call)[0]
        else:
            out = self.model(**call)[0]
        return unpack_grid(out[:, -height * width:].float(), height, width)

    def decode(self, latents: Tensor) -> Tensor:
        config = self.pipe.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(view).to(latents)
        std = torch.tensor(config.latents_std).view(view).to(latents)
        return self.decode_vae(latents[:, :, None] * std + mean)[:, :3, 0]  # RGBA -> its RGB channels


# --- the memory planner ---------------------------------------------------------------------------------------
# QwenImage21Transformer2DModel.forward derives the token layout from img_mask's values (repeat_interleave,
# nonzero, tolist), which meta tensors do not hold. The planner's velocity therefore makes img_mask on the CPU, and
# the layout tensors derived from it stay there; these two move each one to the meta device where it meets the
# activations: LayoutOnMeta in the forward itself, and a pre-hook on every block for the calls no mode sees (a
# gradient-checkpointed block's recomputation in the backward, the planner's measurement of a replayed block).
aten = torch.ops.aten
_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)


def _on_meta(value, boolean_as_positions: bool = False):
    """A CPU tensor on the meta device; a boolean index as its true positions (a meta boolean index would need its
    values to know the result's size)."""
    if not isinstance(value, Tensor) or value.device.type != "cpu":
        return value
    if boolean_as_positions and value.dtype == torch.bool:
        value = value.nonzero().squeeze(-1)
    return value.to("meta")


class LayoutOnMeta(TorchDispatchMode):
    """Operators that meet meta activations with CPU layout tensors run with those moved to the meta device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        if any(t.is_meta for t in tensors) and any(t.device.type == "cpu" and t.dim() for t in tensors):
            args, kwargs = tree_map(lambda v: _on_meta(v, func in _INDEXING), (args, kwargs))
        return func(*args, **kwargs)


def _meta_block_inputs(block: nn.Module, args: tuple, kwargs: dict):
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, Tensor) and hidden.is_meta:
        return tree_map(_on_meta, args), tree_map(_on_meta, kwargs)
    return None


def _layout_to_meta_in_blocks(model: nn.Module) -> None:
    """Hook every transformer block of a meta-device network once (the planner builds several teachers on it)."""
    for block in model.modules():
        if type(block).__name__ == "QwenImage21TransformerBlock" and not getattr(block, "_layout_to_meta", False):
            block.register_forward_pre_hook(_meta_block_inputs, with_kwargs=True)
            block._layout_to_meta = True
