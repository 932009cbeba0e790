"""Tiny diffusers pipelines with random weights, one builder per supported family, for tests and the GPU check.

Each ``build_<family>(folder)`` makes the real diffusers pipeline class from its real component classes at toy
sizes (hidden 16-64, one or two layers), with tokenizers built here from a small vocabulary -- nothing is
downloaded -- and writes it with ``save_pretrained``, so it loads exactly as a downloaded model folder would.
``BUILDERS`` maps a family name to its builder; ``build(family, folder)`` is the one entry point.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

SEED = 0
CLIP_MAX_LENGTH = 77


# --- tokenizers, built locally -----------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE vocabularies (CLIP, Qwen2) are made of."""
    from tokenizers.pre_tokenizers import ByteLevel
    return sorted(ByteLevel.alphabet())


def clip_tokenizer():
    """A CLIP BPE tokenizer with no merges: one token per byte (word ends marked ``</w>``, as CLIP does)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _byte_alphabet():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over letters, digits and punctuation, with and without the word marker."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def qwen2_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with no merges, plus the chat-template special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(_byte_alphabet())}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[])


# Our chat template with Qwen3's output for one user turn (ZImagePipeline calls apply_chat_template with
# add_generation_prompt=True, enable_thinking=True): "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n"
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen3_tokenizer():
    """qwen2_tokenizer with a Qwen3-style chat template (Z-Image's tokenizer is a Qwen2Tokenizer too)."""
    tokenizer = qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# --- text encoders -----------------------------------------------------------------------------------------
def _clip_text(with_projection: bool, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
                            projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5_encoder(d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(vocab_size=128, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                  relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return UMT5EncoderModel(UMT5Config(**kwargs)) if umt5 else T5EncoderModel(T5Config(**kwargs))


def _image_vae(latent_channels: int, scaling_factor: float, shift_factor: float):
    """An AutoencoderKL that halves 16x16 images to 8x8 latents (the SD3 / FLUX VAE at toy size)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                         scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


# --- the families ------------------------------------------------------------------------------------------
def build_sd3(folder: str | Path) -> Path:
    """StableDiffusion3Pipeline: MMDiT, two CLIP text encoders with projection and a T5, 16x16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(4, scaling_factor=1.5, shift_factor=0.1),
        text_encoder=_clip_text(True), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text(True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(64), tokenizer_3=t5_tokenizer())
    return _save(pipe, folder)


def _flux(folder: str | Path, guidance_embeds: bool, pipeline: str = "FluxPipeline") -> Path:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = getattr(diffusers, pipeline)(transformer=transformer, scheduler=scheduler,
                                        vae=_image_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
                                        text_encoder=_clip_text(False), tokenizer=clip_tokenizer(),
                                        text_encoder_2=_t5_encoder(32), tokenizer_2=t5_tokenizer())
    return _save(pipe, folder)


def build_flux_dev(folder: str | Path) -> Path:
    """FluxPipeline, guidance-distilled like FLUX.1-dev (guidance is a network input, no CFG pair)."""
    return _flux(folder, guidance_embeds=True)


def build_flux_schnell(folder: str | Path) -> Path:
    """FluxPipeline without guidance embedding, like FLUX.1-schnell (true CFG when asked for)."""
    return _flux(folder, guidance_embeds=False)


def build_flux_kontext(folder: str | Path) -> Path:
    """FluxKontextPipeline like FLUX.1 Kontext [dev]: flux-dev's components (guidance-embedded, no image encoder);
    the reference image goes through the same VAE."""
    return _flux(folder, guidance_embeds=True, pipeline="FluxKontextPipeline")


def _wan_transformer(channels: int = 16, in_channels: int | None = None, image_dim: int | None = None):
    """A one-block WanTransformer3DModel; ``in_channels`` above ``channels`` for an image-to-video input, and
    ``image_dim`` with an image cross-attention (added k/v of the inner width, 2 x 12) as Wan 2.1 I2V has."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels or channels, out_channels=channels, text_dim=32, freq_dim=32,
                                 ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32, image_dim=image_dim,
                                 added_kv_proj_dim=2 * 12 if image_dim is not None else None)


def _wan21_vae():
    """AutoencoderKLWan (Wan 2.1: z_dim 16, 8x spatial and 4x temporal compression) at toy width."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True],
                            latents_mean=[0.1 * k for k in range(16)], latents_std=[1.0 + 0.1 * k for k in range(16)])


def _wan(folder: str | Path, two_experts: bool) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(SEED)
    vae = _wan21_vae()
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=_wan_transformer(),
                       transformer_2=_wan_transformer() if two_experts else None,
                       boundary_ratio=0.875 if two_experts else None)
    return _save(pipe, folder)


def build_wan21(folder: str | Path) -> Path:
    """WanPipeline with one transformer (Wan 2.1 T2V), UMT5 text encoder, Wan video VAE."""
    return _wan(folder, two_experts=False)


def build_wan22(folder: str | Path) -> Path:
    """WanPipeline with two networks (Wan 2.2 A14B): ``transformer`` for t >= 0.875, ``transformer_2`` below."""
    return _wan(folder, two_experts=True)


def build_wan22_ti2v(folder: str | Path) -> Path:
    """WanPipeline like Wan 2.2 TI2V-5B in text-to-video mode: ``expand_timesteps`` (one timestep per token), one
    transformer on 48 latent channels, and the Wan 2.2 VAE layout -- z_dim 48, 2x2 pixel patches in (12 channels),
    residual down/up blocks, spatial compression 16 -- at toy width, with its own latents_mean / latents_std."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(SEED)
    vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                           patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                           latents_mean=[0.02 * k - 0.4 for k in range(48)],
                           latents_std=[0.5 + 0.02 * k for k in range(48)])
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=_wan_transformer(48),
                       expand_timesteps=True)
    return _save(pipe, folder)


CLIP_VISION_SIZE = 32  # the tiny CLIP vision tower's square input: (32 / 8)^2 patches + the class token


def build_wan21_i2v(folder: str | Path) -> Path:
    """WanImageToVideoPipeline like Wan 2.1 I2V 14B (no ``expand_timesteps``): a transformer on 16 + 16 + 4 input
    channels (latents, the first frame's condition latent, its frame mask) with an image cross-attention of
    ``image_dim`` 32, a two-layer CLIPVisionModel whose penultimate hidden states it reads (a layer's output, not
    the patch embeddings), with its CLIPImageProcessor, and the Wan 2.1 VAE and UMT5 text encoder of build_wan21."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(SEED)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                              num_attention_heads=4, image_size=CLIP_VISION_SIZE, patch_size=8, hidden_act="gelu")
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_VISION_SIZE},
                                   crop_size={"height": CLIP_VISION_SIZE, "width": CLIP_VISION_SIZE})
    pipe = WanImageToVideoPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True),
                                   vae=_wan21_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   image_processor=processor, image_encoder=CLIPVisionModel(vision),
                                   transformer=_wan_transformer(16, in_channels=16 + 16 + 4, image_dim=32))
    return _save(pipe, folder)


def build_wan22_i2v(folder: str | Path) -> Path:
    """WanImageToVideoPipeline like Wan 2.2 I2V A14B: two networks on 16 + 16 + 4 input channels with no image
    cross-attention (no ``image_dim``, so no image encoder or processor), ``transformer`` for t >= 0.9 (the
    checkpoint's ``boundary_ratio``) and ``transformer_2`` below, its flow shift 5, and the Wan 2.1 VAE and UMT5 text
    encoder of build_wan21."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    torch.manual_seed(SEED)
    pipe = WanImageToVideoPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True),
                                   vae=_wan21_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                   transformer=_wan_transformer(16, in_channels=16 + 16 + 4),
                                   transformer_2=_wan_transformer(16, in_channels=16 + 16 + 4), boundary_ratio=0.9)
    return _save(pipe, folder)


def build_hunyuan_video15(folder: str | Path) -> Path:
    """HunyuanVideo15Pipeline like HunyuanVideo-1.5 480p text-to-video: a Qwen2.5-VL text model (3 layers: the
    pipeline reads the third hidden state from the end), a ByT5 glyph encoder for quoted text (ByT5's own
    tokenizer), the dual-stream DiT with one token-refiner and one double-stream block, the HunyuanVideo 1.5 VAE
    (spatial compression 16, temporal 4) at toy width with a scaling factor away from 1, the real checkpoint's
    shift 5 and guider (guidance_scale 6); 32x32 pixels and 5 frames are a (4, 2, 2, 2) latent."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    # Qwen2.5-VL's chat template renders a text-only system + user turn exactly as this Qwen3-style one does
    tokenizer, glyph_tokenizer = qwen3_tokenizer(), ByT5Tokenizer()
    text_width, glyph_width, latent_channels = 16, 16, 4
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>")))
    glyph_encoder = T5EncoderModel(T5Config(
        vocab_size=len(glyph_tokenizer), d_model=glyph_width, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    # in_channels: the noisy latent, the (zero) condition latent and the one-channel condition mask, stacked;
    # head dim 8 = sum of the three RoPE axes
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * latent_channels + 1, out_channels=latent_channels, num_attention_heads=2,
        attention_head_dim=8, num_layers=1, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=text_width,
        text_embed_2_dim=glyph_width, image_embed_dim=8, rope_axes_dim=(2, 2, 4), target_size=64, task_type="t2v")
    vae = AutoencoderKLHunyuanVideo15(latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8, 8),
                                      layers_per_block=1, scaling_factor=0.7)
    pipe = HunyuanVideo15Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=glyph_encoder,
                                  tokenizer_2=glyph_tokenizer, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    return _save(pipe, folder)


def _qwen_image_parts():
    """The QwenImage MMDiT, VAE (latents_mean / latents_std away from 0 / 1) and dynamic-shift scheduler that
    Qwen-Image and Qwen-Image-Edit-Plus share."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True],
                                 latents_mean=[0.0, 0.1, -0.1, 0.2], latents_std=[1.0, 1.2, 0.8, 1.1])
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192)
    return transformer, vae, scheduler


def build_qwen_image(folder: str | Path) -> Path:
    """QwenImagePipeline: Qwen2.5-VL text encoder, QwenImage MMDiT and VAE, 32x32 images."""
    from diffusers import QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(SEED)
    tokenizer = qwen2_tokenizer()
    transformer, vae, scheduler = _qwen_image_parts()
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                     "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer))
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config),
                             tokenizer=tokenizer, transformer=transformer)
    return _save(pipe, folder)


def build_qwen_image_edit_plus(folder: str | Path) -> Path:
    """QwenImageEditPlusPipeline (Qwen-Image-Edit-2509): build_qwen_image's components, with a Qwen2.5-VL encoder
    whose one-block vision tower (patch 14, merge 2, as the real one) reads the condition image, and the vision
    markers as single special tokens it knows by id.

    The processor is a PaddleOCRVLProcessor over a Qwen2-VL image processor, not a Qwen2VLProcessor: transformers
    builds that one only with torchvision installed, for its video processor. For images both expand each
    ``<|image_pad|>`` alike, into ``image_grid_thw.prod() // merge_size**2`` tokens (a 384x384 condition image: 196),
    one per feature the vision tower gives."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers import (
        PaddleOCRVLProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLImageProcessorPil,
    )

    torch.manual_seed(SEED)
    vocab = {char: i for i, char in enumerate(_byte_alphabet())}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<|image_pad|>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>",
                                                                "<|image_pad|>", "<|video_pad|>"]})
    processor = PaddleOCRVLProcessor(tokenizer=tokenizer, image_processor=Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2))
    special_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                     "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                       "patch_size": 14, "spatial_merge_size": 2},
        hidden_size=16, vocab_size=len(tokenizer), **special_ids))
    transformer, vae, scheduler = _qwen_image_parts()
    pipe = QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                     processor=processor, transformer=transformer)
    return _save(pipe, folder)


def build_qwen_image21(folder: str | Path) -> Path:
    """QwenImage21Pipeline: a Qwen3-VL text encoder (two layers, a one-block vision tower it never runs for
    text), the single-stream block-causal transformer (two blocks, ``causal_condition`` as on the real model, head
    dim 16 = its three RoPE axes), the RGBA Qwen-Image 2.1 VAE with the real model's five stages (16x spatial) at
    toy width and latents_mean / latents_std away from 0 / 1, and the real checkpoint's scheduler (dynamic shift,
    ``shift_terminal`` 0.02); 32x64 images are a 16 x 2 x 4 latent.

    The processor is ``qwen3_vl_text_processor`` (see there), not a Qwen3VLProcessor: transformers builds that one
    only with torchvision installed, for its video processor."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(SEED)
    processor = qwen3_vl_text_processor()
    tokenizer = processor.tokenizer
    text_width, latent_channels = 16, 16  # the transformer's context_in_dim and in_channels: encoder width, z_dim
    special_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text_encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config={"hidden_size": text_width, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": text_width, "patch_size": 16, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
        tie_word_embeddings=False, **special_ids))
    transformer = QwenImage21Transformer2DModel(in_channels=latent_channels, out_channels=latent_channels,
                                                num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                                context_in_dim=text_width, mlp_ratio=3, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage21(base_dim=4, decoder_base_dim=6, z_dim=latent_channels, dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False, True, True, True],
                                   latents_mean=[0.05 * k - 0.4 for k in range(latent_channels)],
                                   latents_std=[0.8 + 0.05 * k for k in range(latent_channels)])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    pipe = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=processor,
                               transformer=transformer)
    return _save(pipe, folder)


# Qwen3-VL's chat template for text turns: a message's content is a string or a list of {"type": "text", ...}
# parts (QwenImage21Pipeline counts the tokens of its system turn, given as such a list, to drop them)
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN3_VL_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                           "<|video_pad|>")


def qwen3_vl_text_processor():
    """What QwenImage21Pipeline reads of its Qwen3VLProcessor for text-to-image, in a processor transformers builds
    without torchvision: a byte-level Qwen2 tokenizer (one token per byte) whose chat and vision markers are single
    special tokens, as in Qwen3-VL's vocabulary (the pipeline finds ``<|image_pad|>`` by its id), Qwen3-VL's chat
    template, and a Qwen2-VL image processor (patch 16, merge 2, as Qwen3-VL's). For a prompt without images
    Qwen3VLProcessor only tokenizes, and its ``mm_token_type_ids`` (all text) leave a text-only forward of the
    encoder unchanged; LlavaProcessor tokenizes alike and has no video processor to build."""
    from transformers import LlavaProcessor, Qwen2Tokenizer, Qwen2VLImageProcessorPil

    tokenizer = Qwen2Tokenizer(vocab={char: i for i, char in enumerate(_byte_alphabet())}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN3_VL_SPECIAL_TOKENS)})
    return LlavaProcessor(image_processor=Qwen2VLImageProcessorPil(patch_size=16, merge_size=2), tokenizer=tokenizer,
                          chat_template=QWEN3_VL_CHAT_TEMPLATE, image_token="<|image_pad|>")


def build_z_image(folder: str | Path) -> Path:
    """ZImagePipeline: Qwen3 text encoder, the single-stream Z-Image DiT (one noise and one context refiner block,
    two main blocks), the FLUX-style VAE at toy size, a static shift of 3 as Z-Image-Turbo's scheduler; 16x16
    images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(SEED)
    tokenizer = qwen3_tokenizer()
    text_width = 16  # the transformer's cap_feat_dim is the text encoder's hidden size
    # head_dim (dim / n_heads) must equal sum(axes_dims); the first RoPE axis indexes caption positions (up to the
    # 512-token max_sequence_length, padded to 32) and the image's frame position after them
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=text_width, axes_dims=[8, 4, 4], axes_lens=[640, 32, 32])
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        rope_theta=1000000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>")))
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
                          vae=_image_vae(16, scaling_factor=0.3611, shift_factor=0.1159), text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    return _save(pipe, folder)


# --- FLUX.2 ------------------------------------------------------------------------------------------------
# Mistral's instruct format for a system and a user turn, text parts only (what Flux2Pipeline's format_input sends:
# each message's content is a list of {"type": "text", "text": ...})
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}")
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[IMG]", "[IMG_BREAK]", "[IMG_END]")
FLUX2_TEXT_WIDTH = 16  # hidden size of the tiny text encoders: the transformer's joint_attention_dim is 3x this


def mistral_tokenizer():
    """A byte-level BPE tokenizer (no merges) with Mistral's special tokens and instruct chat template.

    FLUX.2 [dev] ships a PixtralProcessor around its tokenizer, which transformers builds only with torchvision
    installed; Flux2Pipeline calls nothing but ``apply_chat_template`` on it, which the tokenizer has too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(MISTRAL_SPECIAL_TOKENS)}
    for char in _byte_alphabet():
        vocab.setdefault(char, len(vocab))
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]))
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def _flux2_transformer(guidance_embeds: bool):
    """Flux2Transformer2DModel, one double- and one single-stream block; 4 RoPE axes of 4 (head dim 16)."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=3 * FLUX2_TEXT_WIDTH, timestep_guidance_channels=32,
                                   axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)


def _flux2_vae():
    """AutoencoderKLFlux2 halving 16x16 images to 4 x 8 x 8 latents (16 x 4 x 4 once 2x2-patchified), with
    BatchNorm statistics away from 0 / 1 so that the pipeline's latent normalisation is exercised."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                             latent_channels=4, norm_num_groups=4, sample_size=16)
    channels = vae.bn.running_mean.numel()
    vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, channels))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, channels))
    return vae


def _flux2_scheduler():
    """FLUX.2's scheduler config: dynamic (exponential) shifting, mu given by the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential",
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_flux2_dev(folder: str | Path) -> Path:
    """Flux2Pipeline like FLUX.2 [dev]: guidance-embedded transformer, Mistral 3 text encoder (30 tiny layers: the
    pipeline reads hidden states 10, 20 and 30), 16x16 images."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(SEED)
    tokenizer = mistral_tokenizer()
    config = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": FLUX2_TEXT_WIDTH, "intermediate_size": 32,
                     "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "vocab_size": len(tokenizer), "max_position_embeddings": 1024, "rope_theta": 1000000000.0,
                     "sliding_window": None, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "patch_size": 4, "image_size": 16},
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    pipe = Flux2Pipeline(scheduler=_flux2_scheduler(), vae=_flux2_vae(),
                         text_encoder=Mistral3ForConditionalGeneration(config), tokenizer=tokenizer,
                         transformer=_flux2_transformer(guidance_embeds=True))
    return _save(pipe, folder)


def build_flux2_klein(folder: str | Path) -> Path:
    """Flux2KleinPipeline like FLUX.2 [klein] base (``is_distilled`` false: true CFG against ""): no guidance
    embedding, Qwen3 text encoder (27 tiny layers: the pipeline reads hidden states 9, 18 and 27), 16x16 images."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    tokenizer = qwen3_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=FLUX2_TEXT_WIDTH, intermediate_size=32, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        rope_theta=1000000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>")))
    pipe = Flux2KleinPipeline(scheduler=_flux2_scheduler(), vae=_flux2_vae(), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=_flux2_transformer(guidance_embeds=False),
                              is_distilled=False)
    return _save(pipe, folder)


def _save(pipe, folder: str | Path) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


BUILDERS = {
    "sd3": build_sd3,
    "flux-dev": build_flux_dev,
    "flux-schnell": build_flux_schnell,
    "flux-kontext": build_flux_kontext,
    "wan2.1": build_wan21,
    "wan2.2": build_wan22,
    "wan2.2-ti2v": build_wan22_ti2v,
    "wan2.1-i2v": build_wan21_i2v,
    "wan2.2-i2v": build_wan22_i2v,
    "hunyuan-video-1.5": build_hunyuan_video15,
    "qwen-image": build_qwen_image,
    "qwen-image-edit-plus": build_qwen_image_edit_plus,
    "qwen-image21": build_qwen_image21,
    "flux2-dev": build_flux2_dev,
    "flux2-klein": build_flux2_klein,
    "z-image": build_z_image,
}


def build(family: str, folder: str | Path) -> Path:
    """Write the tiny pipeline of ``family`` (a key of BUILDERS) to ``folder`` and return the folder."""
    if family not in BUILDERS:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[family](folder)
