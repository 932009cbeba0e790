"""What a run distils on, encoded once at its start: its prompts, or with ``condition_images`` each image with its
prompt (pdmd.conditions.condition_set), every row's ``cond`` holding both, so rows are drawn together.

Images are opened and encoded a chunk at a time (a VAE at full resolution on a whole folder at once would not fit),
the chunks' conditioning joined row-wise. Without condition images an image teacher that can go without one
(Wan 2.2 TI2V-5B is text-to-video too) distils text-only, as before: making a first frame with a text-to-image
teacher, for a data-free image-to-video run, is a later option.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pdmd.conditions import open_image
from pdmd.teachers.base import Teacher
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.steps import select

IMAGES_PER_ENCODE = 16  # condition pairs encoded in one call


@dataclass
class RunConditioning:
    prompts: list[str]         # the rows of cond / uncond, in order
    cond: Any
    uncond: Any
    sample_prompts: list[str]  # the sample grid's rows and their conditioning
    sample_embeddings: tuple[Any, Any]
    condition_images: int      # 0: text only


def concatenate(parts: list):
    """Conditioning batches (tensors, or dicts / tuples of them; None stays None) joined row-wise."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {key: concatenate([part[key] for part in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concatenate(list(items)) for items in zip(*parts))
    return first


def encode_pairs(teacher: Teacher, pairs: list) -> tuple[Any, Any]:
    """``teacher.encode(prompts, images)`` of every (image file, prompt) pair, a chunk at a time."""
    chunks = []
    for start in range(0, len(pairs), IMAGES_PER_ENCODE):
        part = pairs[start:start + IMAGES_PER_ENCODE]
        chunks.append(teacher.encode([prompt for _, prompt in part], [open_image(path) for path, _ in part]))
    return concatenate([cond for cond, _ in chunks]), concatenate([uncond for _, uncond in chunks])


def encode_run(config: TrainConfig, teacher: Teacher) -> RunConditioning:
    """The run's rows, encoded with the text encoders (and VAE) once; ConfigError before any work when the
    teacher cannot take what the config gives it."""
    pairs = config.condition_pairs()
    if pairs:
        if "image" not in teacher.conditions:
            raise ConfigError(f"condition_images: {teacher.name} is a text-only teacher: it takes no image")
        prompts = [prompt for _, prompt in pairs]
        with torch.no_grad():
            cond, uncond = encode_pairs(teacher, pairs)
        rows = slice(min(4, len(prompts)))
        return RunConditioning(prompts, cond, uncond, prompts[rows], tuple(select(c, rows) for c in (cond, uncond)),
                               len(pairs))
    prompts = list(config.prompts or teacher.default_prompts)
    if not prompts:
        raise ConfigError("prompts is empty and the teacher ships no default prompt list")
    extra = list(config.sample_prompts)  # without its own, the sample grid shows the first training prompts
    with torch.no_grad():  # every embedding of the run in one call: afterwards nothing needs the text encoders
        cond, uncond = teacher.encode(prompts + extra)
    sample_rows = slice(len(prompts), None) if extra else slice(min(4, len(prompts)))
    return RunConditioning(prompts, *(select(c, slice(len(prompts))) for c in (cond, uncond)),
                           extra or prompts[:4], tuple(select(c, sample_rows) for c in (cond, uncond)), 0)
