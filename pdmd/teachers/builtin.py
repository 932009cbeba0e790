"""The built-in teacher: a tiny class-conditional flow-matching UNet over the scenes of pdmd.builtin.scenes.

It ships in assets/builtin-teacher (diffusers format, fp16 safetensors) and runs on a 2-core CPU. Its latent
is the image itself, values in [-1, 1], optionally folded into PxP patches (P = 2 turns a 32x32 RGB image
into (12, 16, 16), four times cheaper per layer); the patch size follows from the model's input channels, so
``decode`` needs nothing but the model.
"""
from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors import safe_open
from torch import Tensor
from torch.nn.functional import pixel_shuffle, pixel_unshuffle

from pdmd.builtin import scenes
from pdmd.paths import BUILTIN_TEACHER_DIR
from pdmd.teachers.base import Teacher

ASSET_DIR = BUILTIN_TEACHER_DIR
ASSET_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "teacher.json")
REBUILD_COMMAND = "python -m pdmd train-teacher --out assets/builtin-teacher --resume latest"

# Architectures `train-teacher --arch` can build; their measured quality is in docs/benchmarks.md.
# name -> (patch size, UNet2DModel keyword arguments)
ARCHITECTURES: dict[str, tuple[int, dict]] = {
    # the session-1 teacher: 2x2 patches, additive class conditioning
    "patch2-small": (2, dict(block_out_channels=(48, 96, 96), layers_per_block=1,
                             down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))),
    # the shipped teacher. Full resolution: convolutions see every pixel of a 6-pixel star's points; FiLM
    "pixel": (1, dict(block_out_channels=(32, 64, 96, 96), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
                      resnet_time_scale_shift="scale_shift")),
    # 2x2 patches, wider, attention at 8x8 and 4x4, FiLM conditioning
    "patch2-wide": (2, dict(block_out_channels=(64, 128, 128), layers_per_block=1,
                            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                            resnet_time_scale_shift="scale_shift")),
}
DEFAULT_ARCHITECTURE = "pixel"
# the model's timestep input is t * 1000, the range its sinusoidal embedding was designed for
TIMESTEP_SCALE = 1000.0

# Defaults chosen from the measurements in docs/benchmarks.md ("Built-in teacher").
DEFAULT_STEPS = 32
DEFAULT_CFG = 5.0
DEFAULT_SHIFT = 1.0


class AssetError(RuntimeError):
    """A shipped asset is missing or unreadable; the message names the file and the command that rebuilds it."""


def build_model(architecture: str = DEFAULT_ARCHITECTURE) -> UNet2DModel:
    """The teacher network of one of ARCHITECTURES, untrained."""
    patch, kwargs = ARCHITECTURES[architecture]
    channels = 3 * patch * patch
    return UNet2DModel(sample_size=scenes.IMAGE_SIZE // patch, in_channels=channels, out_channels=channels,
                       norm_num_groups=16, attention_head_dim=32, num_class_embeds=scenes.NUM_CLASSES, **kwargs)


def patch_size(model: UNet2DModel) -> int:
    """The fold of a model's latent, from its input channels (3 per pixel of a patch)."""
    return math.isqrt(model.config.in_channels // 3)


def images_to_latents(images: Tensor, patch: int) -> Tensor:
    """Images (B, 3, 32, 32) in [0, 1] -> latents (B, 3 P^2, 32/P, 32/P) in [-1, 1]."""
    return pixel_unshuffle(images * 2 - 1, patch)


def latents_to_images(latents: Tensor, patch: int) -> Tensor:
    return ((pixel_shuffle(latents, patch) + 1) / 2).clamp(0, 1)


class BuiltinTeacher(Teacher):
    name = "builtin"
    default_steps = DEFAULT_STEPS
    default_cfg = DEFAULT_CFG
    default_shift = DEFAULT_SHIFT
    lora_prefix = "unet"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
    # distillation is data-free: every full prompt of the grammar (colour x shape x background)
    default_prompts = tuple(scenes.prompt_for(c, s, b) for c, s, b in itertools.product(
        range(len(scenes.COLOURS)), range(len(scenes.SHAPES)), range(len(scenes.BACKGROUNDS))))

    def __init__(self, model: UNet2DModel, info: dict | None = None):
        self.model = model
        self.info = info or {}  # provenance from teacher.json (training steps, command)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> class ids, and the all-"none" class as the unconditional branch.

        Words the grammar does not know are reported with a warning; a prompt naming two colours (or two
        shapes, or two backgrounds) raises scenes.PromptError.
        """
        ids = []
        for prompt in prompts:
            parsed = scenes.parse_prompt(prompt)
            if parsed.unknown:
                warnings.warn(f"prompt {prompt!r}: unknown word(s) {', '.join(parsed.unknown)} ignored",
                              stacklevel=2)
            ids.append(parsed.class_id)
        cond = torch.tensor(ids, dtype=torch.long, device=self.device)
        return cond, torch.full_like(cond, scenes.UNCONDITIONAL_CLASS)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.model(x, t * TIMESTEP_SCALE, class_labels=cond).sample

    @property
    def latent_shape(self) -> tuple[int, ...]:
        patch = patch_size(self.model)
        return (3 * patch * patch, scenes.IMAGE_SIZE // patch, scenes.IMAGE_SIZE // patch)

    def decode(self, latents: Tensor) -> Tensor:
        return latents_to_images(latents.float(), patch_size(self.model))


def _check_assets(path: Path) -> dict:
    """Fail with the file's name and the rebuild command before diffusers gives a less helpful error."""
    def fail(file: Path, problem: str):
        raise AssetError(f"built-in teacher asset {file} {problem}; rebuild it with: {REBUILD_COMMAND}")

    for name in ASSET_FILES:
        if not (path / name).is_file():
            fail(path / name, "is missing")
    for name in ("config.json", "teacher.json"):
        try:
            json.loads((path / name).read_text())
        except (OSError, ValueError) as err:
            fail(path / name, f"is corrupt ({err})")
    weights = path / "diffusion_pytorch_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        fail(weights, f"is corrupt ({err})")
    return json.loads((path / "teacher.json").read_text())


def load_builtin_teacher(path: str | Path | None = None, device: str | torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> BuiltinTeacher:
    """Load the shipped teacher (fp16 on disk, float32 in memory by default: CPUs are slow at fp16)."""
    path = Path(path) if path is not None else ASSET_DIR
    info = _check_assets(path)
    try:
        model = UNet2DModel.from_pretrained(str(path), torch_dtype=dtype)
    except Exception as err:  # a config that does not match the weights, a wrong diffusers class, ...
        raise AssetError(f"built-in teacher in {path} does not load ({err}); "
                         f"rebuild it with: {REBUILD_COMMAND}") from err
    model.to(device or "cpu").eval().requires_grad_(False)
    return BuiltinTeacher(model, info)
