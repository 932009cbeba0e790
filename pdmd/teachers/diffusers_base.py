"""What every diffusers flow-matching teacher shares: loading a pipeline folder, dtype and device placement,
CPU offload of the text encoders and the VAE, prompt encoding and the timestep schedule of its scheduler.

A family module (sd3.py, flux.py, wan.py, qwen_image.py) adds the transformer call (``velocity``), the latent
shape and the decode, each written to match that pipeline's own ``__call__`` in diffusers 0.42.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from pdmd import limits
from pdmd.paths import DEFAULT_PROMPTS
from pdmd.teachers.base import Teacher, TeacherError
from pdmd.teachers.quantize import module_bytes  # real storage: a torchao int8 weight is 1 byte, not its bf16 face

MEMORY_ADVICE = ("load it in bf16 (--dtype bf16 / dtype: bf16), keep the text encoders and the VAE on the CPU "
                 "(--offload / offload: true), and train with gradient_checkpointing: true")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def default_prompts() -> tuple[str, ...]:
    """The shipped prompt list real teachers are distilled on when a config gives none (one a line, # comments)."""
    lines = (line.strip() for line in DEFAULT_PROMPTS.read_text().splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TeacherError(f"dtype {dtype!r} is unknown; choose {', '.join(DTYPES)}")
    return DTYPES[dtype]


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: ``cuda`` (no index) is the current CUDA device, as PyTorch places on it."""
    def resolved(device: torch.device) -> torch.device:
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device
    return resolved(torch.device(a)) == resolved(torch.device(b))


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: the driver's free memory plus the blocks PyTorch's caching allocator holds unused
    (reserved, not allocated), which it hands out before asking the driver; None where it is not measured (the CPU)."""
    if device.type == "cuda":
        unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused_cache
    return None


class DiffusersTeacher(Teacher):
    """A diffusers pipeline as a teacher. ``model`` is its transformer (the network LoRA experts attach to).

    Latents are float32 whatever the network's dtype (as WanPipeline keeps them): the Euler steps stay exact and
    the transformer gets its input cast to its own dtype.
    """

    prompt_length: int              # max_sequence_length the pipeline's own __call__ uses
    default_size: tuple[int, int]   # (height, width) in pixels, the pipeline's default

    def __init__(self, pipe, source: str, device: str | torch.device | None = None, offload: bool = False,
                 height: int | None = None, width: int | None = None):
        self.pipe, self.source, self.offload = pipe, source, offload
        self.name = source
        self.default_prompts = default_prompts()
        self.height, self.width = (int(height or self.default_size[0]), int(width or self.default_size[1]))
        if not (0 < self.height <= limits.MAX_SIDE and 0 < self.width <= limits.MAX_SIDE):
            raise TeacherError(f"{source}: height and width must lie between 1 and {limits.MAX_SIDE} pixels "
                               f"(got {self.height}x{self.width})")
        multiple = self.size_multiple()
        if self.height % multiple or self.width % multiple:
            raise TeacherError(f"{source}: height and width must be multiples of {multiple} "
                               f"(got {self.height}x{self.width})")
        self.model = self.build_model()
        self.model.eval().requires_grad_(False)
        self.text_encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                              if getattr(pipe, n, None) is not None]
        for encoder in self.text_encoders:
            encoder.eval().requires_grad_(False)
        pipe.vae.eval().requires_grad_(False)
        # modules kept on the CPU and borrowed by the device only while they run
        self._offloaded = {id(m) for m in (*self.text_encoders, pipe.vae)} if offload else set()
        self._to_device([m for m in (self.model, *self.text_encoders, pipe.vae) if id(m) not in self._offloaded],
                        torch.device(device or "cpu"))
        self.default_shift = self.scheduler_shift()

    # --- what a family defines ----------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return self.pipe.transformer

    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE downsampling times patching)."""
        return self.pipe.vae_scale_factor * 2

    def image_tokens(self) -> int:
        """Length of the transformer's image sequence, for the resolution-dependent shift (FLUX, Qwen-Image)."""
        raise NotImplementedError

    # --- placement ----------------------------------------------------------------------------------------
    def _to_device(self, modules: list[nn.Module], device: torch.device) -> None:
        """Move ``modules`` to ``device``; a model too big for it gets a message with the memory options."""
        needed = sum(module_bytes(m) for m in modules if not same_device(next(m.parameters()).device, device))
        free = free_device_memory(device)
        if free is not None and needed > free:
            raise TeacherError(f"{self.source} needs {needed / 2**30:.1f} GiB on {device} but {free / 2**30:.1f} "
                               f"GiB are free: {MEMORY_ADVICE}")
        try:
            for module in modules:
                module.to(device)
        except torch.OutOfMemoryError as err:
            raise TeacherError(f"{self.source} does not fit on {device} ({err}): {MEMORY_ADVICE}") from None

    def release_text_encoders(self) -> None:
        """Text encoders to the CPU once the prompts are encoded (the trainer encodes its training and sample
        prompts once, and samples with ``sample_encoded``); a later encode borrows them back."""
        for encoder in self.text_encoders:
            encoder.to("cpu")
            self._offloaded.add(id(encoder))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def _borrowed(self, module: nn.Module):
        """``module`` on the teacher's device while in use; an offloaded one goes back to the CPU afterwards."""
        if id(module) not in self._offloaded:
            yield module
            return
        self._to_device([module], self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def text_device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (diffusers keeps a few small modules in fp32: not its first parameter)."""
        return self.pipe.transformer.dtype

    def on_model(self, tensor: Tensor | None) -> Tensor | None:
        """A conditioning tensor on the transformer's device; floating ones in its dtype."""
        if tensor is None:
            return None
        return tensor.to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)

    # --- the Teacher interface ----------------------------------------------------------------------------
    def noise(self, batch: int, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.latent_shape), generator=generator).to(self.device)

    def options(self) -> dict:
        return {"height": self.height, "width": self.width,
                **({"teacher_loras": self.style_loras} if self.style_loras else {})}

    def scheduler_shift(self) -> float:
        """The timestep shift of the pipeline's scheduler. A resolution-dependent ("dynamic") shift uses
        exp(mu): the scheduler's exponential time shift exp(mu) / (exp(mu) + 1/t - 1) is the ordinary shift."""
        config = self.pipe.scheduler.config
        if config.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift
            mu = calculate_shift(self.image_tokens(), config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
            return float(math.exp(mu))
        return float(config.get("flow_shift") or config.get("shift") or 1.0)

    @staticmethod
    def timesteps(t: Tensor, x: Tensor) -> Tensor:
        """A (B,) float32 timestep tensor for ``x``'s batch, from a scalar or (B,) ``t``."""
        return torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])

    def decode_vae(self, latents: Tensor) -> Tensor:
        """Run the VAE decoder on already unscaled latents; images in [0, 1]."""
        with self._borrowed(self.pipe.vae) as vae:
            latents = latents.to(next(vae.parameters()).device, vae.dtype)
            return ((vae.decode(latents, return_dict=False)[0].float() + 1) / 2).clamp(0, 1)

    def encode_vae(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> float32 latents, not yet normalised: the mode of the VAE's posterior, as pipelines
        encode a condition image (``retrieve_latents(..., sample_mode="argmax")``)."""
        with self._borrowed(self.pipe.vae) as vae:
            pixels = pixels.to(next(vae.parameters()).device, vae.dtype)
            return vae.encode(pixels).latent_dist.mode().to(self.device, torch.float32)

    def encode_with(self, encode) -> Any:
        """Call the pipeline's own ``encode_prompt`` (``encode``) with the text encoders on the teacher's device
        (borrowed for the call when offloaded), and bring every tensor to the transformer."""
        with ExitStack() as stack:
            for encoder in self.text_encoders:
                stack.enter_context(self._borrowed(encoder))
            result = encode(self.text_device)
        return tuple(self.on_model(r) if isinstance(r, Tensor) or r is None else r for r in result)


class PackedLatentTeacher(DiffusersTeacher):
    """FLUX.1 and Qwen-Image: the transformer sees 2x2 latent patches as tokens; ``latent_shape`` is unpacked."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        factor = self.pipe.vae_scale_factor
        return self.model.config.in_channels // 4, self.height // factor, self.width // factor

    def image_tokens(self) -> int:
        _, height, width = self.latent_shape
        return (height // 2) * (width // 2)


def pack_2x2(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches as tokens, the layout of FluxPipeline._pack_latents
    (QwenImagePipeline packs the same way)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_2x2(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack_2x2 for a latent of ``height`` x ``width``."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)
