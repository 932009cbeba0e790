"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline``), written to match the pipeline's ``__call__`` in
diffusers 0.42:

- prompts go through the pipeline's own ``encode_prompt``: the Qwen2.5-VL text model reads the prompt inside the
  pipeline's system-message chat template, padded to 1000 + 108 tokens, and gives its third hidden state from the
  end with the template's first 108 tokens cropped off (1000 tokens and their mask); the ByT5 glyph encoder reads
  the text between quotes (``Text "..."``, 256 tokens and their mask), and gives zeros with an all-false mask for a
  prompt that quotes nothing. The negative prompt is ``""`` (the pipeline's ``negative_prompt=None``), rendered as
  the template's ``" "`` like every empty prompt;
- latents are (C, F, H/16, W/16) with F = (frames - 1) / 4 + 1, drawn in that shape as the pipeline does; the
  transformer takes them stacked on the channel axis with the all-zero condition latent and condition mask of
  text-to-video (2 C + 1 channels), and 729 all-zero image tokens (which the transformer masks out);
- the timestep is the scheduler's t * 1000 in the transformer's dtype, and the transformer's output is the
  velocity; the shift is the scheduler's (5.0 for the 480p checkpoint);
- guidance is the pipeline's ``guider`` (a ``ClassifierFreeGuidance`` component, not a ``__call__`` argument): its
  ``guidance_scale`` s is this teacher's default CFG, mixed as the guider does (``uncond + s (cond - uncond)``; with
  ``use_original_formulation`` ``cond + s (cond - uncond)``, which is ordinary CFG at 1 + s), one evaluation a step
  where the guider turns CFG off (disabled, or s at 1, or at 0 for the original formulation);
- decode as ``latents / scaling_factor`` through the HunyuanVideo 1.5 VAE; frames (B, F, 3, H, W) in [0, 1].

Not reproduced: the guider's ``guidance_rescale`` and its ``start`` / ``stop`` step window (0, 0 and 1 in the
published checkpoints, where they do nothing); in bf16 the pipeline keeps its latents in the transformer's dtype
between steps, here they stay float32 (as for every family). The pipeline's default size, when none is given, is
its own rule: the bucket of its transformer's ``target_size`` closest to 16:9 (480 x 848 for the 480p checkpoint),
121 frames, 50 steps.

HunyuanVideo15Pipeline has no LoRA loader mixin in diffusers 0.42 (no ``pipe.load_lora_weights``): a diffusers-layout
LoRA loads into its transformer with ``pipe.transformer.load_lora_adapter(..., prefix="transformer")``, which is
what the model card's snippet does.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from pdmd.teachers.base import TeacherError
from pdmd.teachers.diffusers_base import DiffusersTeacher

NEGATIVE_PROMPT = ""          # encode_prompt(prompt=None) encodes [""] * batch
PIPELINE_STEPS = 50           # HunyuanVideo15Pipeline.__call__'s num_inference_steps
PIPELINE_FRAMES = 121         # and its num_frames
TRAIN_TIMESTEPS = 1000        # the scheduler's num_train_timesteps: timestep = t * 1000
# The conditioning tensors encode_prompt returns, in its order, and the transformer arguments they feed
CONDITIONING = {"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_attention_mask",
                "prompt_embeds_2": "encoder_hidden_states_2", "prompt_embeds_mask_2": "encoder_attention_mask_2"}


class HunyuanVideo15Teacher(DiffusersTeacher):
    family = "hunyuan-video-1.5"
    prompt_length = 1000      # the pipeline's tokenizer_max_length: Qwen2.5-VL tokens after the template's crop
    glyph_length = 256        # its tokenizer_2_max_length: ByT5 tokens of the quoted text
    default_steps = PIPELINE_STEPS
    is_video = True

    def __init__(self, pipe, *args, num_frames: int | None = None, **kwargs):
        self.num_frames = int(num_frames or PIPELINE_FRAMES)
        temporal = pipe.vae_scale_factor_temporal
        if self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise TeacherError(f"num_frames = {self.num_frames}: HunyuanVideo 1.5 needs 1 + a multiple of {temporal} "
                               "frames (its VAE decodes 1 + 4 (F - 1) frames from F latent frames)")
        guider = pipe.guider.config
        self.original_formulation = bool(guider.get("use_original_formulation", False))
        scale = float(guider.get("guidance_scale", 1.0))
        # the guider's CFG as our cfg (v_uncond + cfg (v_cond - v_uncond)); 1 where the guider runs one evaluation
        cfg = 1.0 + scale if self.original_formulation else scale
        self.default_cfg = cfg if guider.get("enabled", True) and not math.isclose(cfg, 1.0) else 1.0
        for module in pipe.vae.modules():  # the same mask, a slice per frame instead of per token (see below)
            if hasattr(module, "prepare_causal_attention_mask"):
                module.prepare_causal_attention_mask = frame_causal_mask
        super().__init__(pipe, *args, **kwargs)

    @property
    def default_size(self) -> tuple[int, int]:
        """__call__'s height and width when none are given: the target-size bucket closest to 16:9."""
        width, height = self.pipe.default_aspect_ratio
        return tuple(self.pipe.video_processor.calculate_default_height_width(height, width, self.pipe.target_size))

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size

    def options(self) -> dict:
        return {**super().options(), "num_frames": self.num_frames}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        frames = (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        spatial = self.pipe.vae_scale_factor_spatial
        return self.pipe.vae.config.latent_channels, frames, self.height // spatial, self.width // spatial

    def encode_texts(self, texts: list[str]) -> dict:
        encoded = self.encode_with(
            lambda device: self.pipe.encode_prompt(prompt=list(texts), device=device, dtype=self.dtype,
                                                   batch_size=len(texts)))
        return dict(zip(CONDITIONING, encoded))

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        # the unconditional branch even where the guider's CFG is off (a CFG-distilled checkpoint): a run's teacher
        # CFG or a student's may still guide
        return self.encode_texts(prompts), self.encode_texts([NEGATIVE_PROMPT] * len(prompts))

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, cfg: float) -> Tensor:
        if self.original_formulation:  # the guider's cond + s (cond - uncond), s = cfg - 1
            return v_cond + (cfg - 1.0) * (v_cond - v_uncond)
        return super().combine_guidance(v_cond, v_uncond, cfg)  # uncond + s (cond - uncond): the guider's own

    def velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        if x.is_meta:  # the memory planner: see MetaConstants
            with MetaConstants():
                masks = {k: torch.ones_like(cond[k]) for k in ("prompt_embeds_mask", "prompt_embeds_mask_2")}
                return self._velocity(x, t, {**cond, **masks})
        return self._velocity(x, t, cond)

    def _velocity(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        batch, channels = x.shape[:2]
        latents = x.to(self.dtype)
        # text-to-video: the condition latent and its mask are zeros (prepare_cond_latents_and_mask), and so are the
        # 729 image tokens, which tell the transformer to mask the image stream out
        condition = latents.new_zeros(batch, channels + 1, *x.shape[2:])
        config = self.model.config
        image_embeds = latents.new_zeros(batch, self.pipe.vision_num_semantic_tokens, config.image_embed_dim)
        timestep = (self.timesteps(t, x) * TRAIN_TIMESTEPS).to(self.dtype)  # t.expand(B).to(latents' dtype)
        out = self.model(hidden_states=torch.cat([latents, condition], dim=1), image_embeds=image_embeds,
                         timestep=timestep, **{CONDITIONING[k]: cond[k] for k in CONDITIONING}, return_dict=False)[0]
        return out.float()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> frames (B, F, 3, H, W) in [0, 1], one video at a time: the VAE's causal attention mask is
        (B, L, L) against (B, 1, L, C) queries, which broadcasts only for B = 1 (the stock pipeline fails to decode
        a batch of two; the VAE's own ``use_slicing`` decodes one at a time alike)."""
        unscaled = latents / self.pipe.vae.config.scaling_factor
        frames = torch.cat([self.decode_vae(one) for one in unscaled.split(1)])
        return frames.permute(0, 2, 1, 3, 4)


def frame_causal_mask(n_frame: int, n_hw: int, dtype, device, batch_size: int | None = None) -> Tensor:
    """The VAE attention's causal mask -- token i sees every token of its own and earlier frames -- with one slice
    assignment per frame, where diffusers' ``prepare_causal_attention_mask`` makes one per token: 49,290 of them at
    480x848x121, seconds of kernel launches on a GPU and of dispatches in the memory planner's trace, for the same
    (L, L) tensor and no other allocation."""
    mask = torch.full((n_frame * n_hw, n_frame * n_hw), float("-inf"), dtype=dtype, device=device)
    for frame in range(n_frame):
        mask[frame * n_hw:(frame + 1) * n_hw, :(frame + 1) * n_hw] = 0
    return mask if batch_size is None else mask.unsqueeze(0).expand(batch_size, -1, -1)


aten = torch.ops.aten
# operators whose output holds its first argument's value wherever it is constant (copies, views, casts)
_SAME_VALUE = {aten._to_copy.default, aten.clone.default, aten.view.default, aten._unsafe_view.default,
               aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.select.int, aten.slice.Tensor,
               aten.alias.default, aten.detach.default, aten.permute.default, aten.transpose.int, aten.repeat.default,
               aten.lift_fresh.default, aten.unbind.int, aten.split.Tensor}
_FILLED = {aten.zeros.default: 0, aten.ones.default: 1, aten.zeros_like.default: 0, aten.ones_like.default: 1,
           aten.new_zeros.default: 0, aten.new_ones.default: 1}


class MetaConstants(TorchDispatchMode):
    """Constant values followed through meta tensors, for the memory planner.

    On the meta device tensors have shapes and no values, and HunyuanVideo15Transformer3DModel.forward branches on
    two: whether its image tokens are all zero (``if is_t2v``) and which tokens each mask keeps (it gathers the
    kept ones first, ``text[text_mask]``, then the rest). In text-to-video every tensor these depend on is a
    constant: the zero image tokens and the masks (the planner's all true; what they keep never changes the
    sequence's length, since the transformer keeps the masked tokens too, zeroed, after the kept ones). This mode
    records the constant of every tensor made filled, follows it through copies, views, comparisons and
    reductions, and answers ``bool()`` and a boolean-mask gather from it, by the real operators' shapes."""

    def __init__(self):
        super().__init__()
        self.constants: dict[int, tuple[weakref.ref, object]] = {}

    def constant(self, value) -> object | None:
        if not isinstance(value, Tensor):
            return None
        entry = self.constants.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else None

    def record(self, tensor, value) -> None:
        if isinstance(tensor, Tensor) and value is not None:
            key = id(tensor)
            self.constants[key] = (weakref.ref(tensor, lambda _, key=key: self.constants.pop(key, None)), value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = self.constant(args[0]) if args else None
        if func is aten._local_scalar_dense.default:  # bool(t) / t.item()
            if first is None:
                raise TeacherError("the planner met a value-dependent branch on a tensor whose value it does not know")
            return bool(first) if args[0].dtype == torch.bool else first
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            return self.gather(args[0], args[1])
        out = func(*args, **kwargs)
        if func._schema.is_mutable and args:  # written in place: whatever it held is gone (fill_ says what it is now)
            self.constants.pop(id(args[0]), None)
            if func is aten.fill_.Scalar:
                self.record(args[0], args[1])
        if func in _FILLED:
            self.record(out, _FILLED[func])
        elif func in (aten.full.default, aten.full_like.default, aten.new_full.default):
            self.record(out, args[1] if func is not aten.new_full.default else args[2])
        elif first is None:
            pass
        elif func in _SAME_VALUE:  # one tensor, or a tuple of them (unbind, split)
            for each in (out if isinstance(out, (tuple, list)) else (out,)):
                self.record(each, bool(first) if each.dtype == torch.bool else first)
        elif func is aten.eq.Scalar:
            self.record(out, first == args[1])
        elif func is aten.ne.Scalar:
            self.record(out, first != args[1])
        elif func in (aten.bitwise_not.default, aten.logical_not.default):
            self.record(out, not first)
        elif func in (aten.all.default, aten.all.dim, aten.all.dims, aten.any.default, aten.any.dim, aten.any.dims):
            self.record(out, bool(first))
        return out

    def gather(self, source: Tensor, indices) -> Tensor:
        """``source[mask]`` for a constant boolean mask over its leading dimensions: all of them or none."""
        if len(indices) != 1 or self.constant(indices[0]) is None:
            raise TeacherError("the planner met a boolean-mask gather whose mask it does not know")
        mask = indices[0]
        kept = mask.numel() if self.constant(mask) else 0
        return source.new_empty((kept, *source.shape[mask.dim():]))  # a fresh tensor, as the gather makes
