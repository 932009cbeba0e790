"""What a run distils on, encoded once at its start: its prompts, or with condition images each image with its
prompt (pdmd.conditions.condition_set), every row's ``cond`` holding both, so rows are drawn together.

A conditioned teacher's images come from ``condition_images`` or, data-free, are drawn from the run's prompts
(``condition_teacher``): one image per prompt, sampled at the drawing teacher's own steps and CFG (a video's first
frame), written to the run folder's ``conditions/`` with its prompts.txt so a resumed run reads the same ones. The
teacher itself draws them by default where its task is the conditioned one and it can sample from prompts alone (an
editing model: its own text-to-image outputs are images it edits, in its own distribution, with no data to license);
a model that cannot (Wan 2.1 I2V) needs a text-to-image teacher named, and one that is a text-only model too (Wan 2.2
TI2V-5B, text-to-video) distils text-only unless asked (``condition_teacher: self``), since its student would
otherwise need an image.

Images are opened and encoded a chunk at a time (a VAE at full resolution on a whole folder at once would not fit),
the chunks' conditioning joined row-wise.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pdmd import limits
from pdmd.conditions import PROMPTS_FILE, condition_set, open_row
from pdmd.media import save_png
from pdmd.teachers.base import Teacher
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.steps import select

IMAGES_PER_ENCODE = 16  # condition pairs encoded in one call
DRAWN_PER_CALL = 4      # condition images one drawing call samples (a batch of full teacher samples)
SELF, NONE = "self", "none"  # condition_teacher: the run's teacher draws them / a text-only run


@dataclass
class RunConditioning:
    prompts: list[str]         # the rows of cond / uncond, in order
    cond: Any
    uncond: Any
    sample_prompts: list[str]  # the sample grid's rows and their conditioning
    sample_embeddings: tuple[Any, Any]
    condition_images: int      # 0: text only
    condition_source: str | None = None  # where they came from: the condition_images given, or who drew them


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
        chunks.append(teacher.encode([prompt for _, prompt in part], [open_row(row) for row, _ in part]))
    return concatenate([cond for cond, _ in chunks]), concatenate([uncond for _, uncond in chunks])


def condition_source(config: TrainConfig, teacher: Teacher) -> str | None:
    """Where the run's condition images come from: "images" (``condition_images``), the teacher that draws them
    (SELF or an id), or None for a text-only run; ConfigError where the teacher cannot take what is asked."""
    chooser = config.condition_teacher
    takes_images = "image" in teacher.conditions
    if config.condition_images is not None:
        if not takes_images:
            raise ConfigError(f"condition_images: {teacher.name} is a text-only teacher: it takes no image")
        return "images"
    if not takes_images:
        if chooser not in (None, NONE):
            raise ConfigError(f"condition_teacher: {teacher.name} is a text-only teacher: it takes no image")
        return None
    if chooser is None:
        chooser = SELF if teacher.conditions_by_default else NONE
    if teacher.needs_conditions and chooser in (SELF, NONE):
        said = "" if config.condition_teacher is None else f"condition_teacher: {chooser}: "
        raise ConfigError(f"{said}{teacher.name} cannot sample from prompts alone: give condition_images (a folder of "
                          f"images with its {PROMPTS_FILE}) or condition_teacher: a text-to-image teacher's id or "
                          "folder, to draw them from the run's prompts")
    return None if chooser == NONE else chooser


def draw_conditions(drawer: Teacher, prompts: list[str], folder: Path, seed: int, write: bool = True,
                    wait: Callable[[], None] = lambda: None) -> list[tuple[Path, str]]:
    """(image file, prompt) pairs drawn by ``drawer``: image k is a sample of prompt k at the drawer's own steps and
    CFG, the first frame of a video, seeded per call (seed + call), written as ``folder``/NNNNNN.png with its
    prompts.txt. A folder already complete for these prompts (a resumed run) is read as it is. Every rank draws the
    same images (a sharded network samples only with all ranks), the one that ``write``s saves them, and all read
    them back after ``wait``."""
    lines = [" ".join(prompt.split()) for prompt in prompts]  # one line each in prompts.txt
    if _drawn_for(folder) != lines:
        pictures = []
        for call, start in enumerate(range(0, len(lines), DRAWN_PER_CALL)):
            part = lines[start:start + DRAWN_PER_CALL]
            with torch.no_grad():
                decoded = drawer.decode(drawer.sample(part, seed=seed + call).sample).float().cpu()
            pictures.extend(decoded[:, 0] if decoded.dim() == 5 else decoded)  # a video's first frame
        if write:
            _write_drawn(folder, pictures, lines)
    wait()
    return condition_set(folder)


def _drawn_for(folder: Path) -> list[str] | None:
    """The prompts a finished drawing in ``folder`` was made for (None: nothing finished there)."""
    lines = folder / PROMPTS_FILE
    return [line.strip() for line in lines.read_text().splitlines() if line.strip()] if lines.is_file() else None


def _write_drawn(folder: Path, pictures: list, lines: list[str]) -> None:
    """The drawn images and their prompts.txt, into a temporary folder renamed into place: a run cut while writing
    leaves no half drawing that would be read as finished."""
    temporary = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for k, picture in enumerate(pictures):
        save_png(picture[None], temporary / f"{k:06d}.png")
    (temporary / PROMPTS_FILE).write_text("\n".join(lines) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


@contextmanager
def drawing_teacher(source: str, teacher: Teacher, roles, config: TrainConfig, device):
    """The teacher that draws a run's condition images: the run's own (``roles``: its adapters off) for SELF, else
    ``source`` loaded on ``device`` at the run teacher's size and freed afterwards (under fsdp it is loaded whole on
    every rank)."""
    if source == SELF:
        with roles.active(None):
            yield teacher
        return
    from pdmd.teachers import BUILTIN, load_teacher

    size = {} if source == BUILTIN else {k: getattr(teacher, k, None) for k in ("height", "width")}
    drawer = load_teacher(source, device=device, dtype=None if source == BUILTIN else config.dtype,
                          offload=config.offload, **size)
    try:
        yield drawer
    finally:
        del drawer
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def condition_pairs(config: TrainConfig, teacher: Teacher, folder: Path, draw_with: Callable[[str], Any],
                    **draw) -> tuple[list, str | None]:
    """The run's (image file, prompt) pairs and a line saying where they came from ([] and None: text-only).
    ``draw_with(source)``: a context manager giving the teacher that draws (the run's own with its adapters off, or
    another loaded for the drawing and freed after); ``draw``: draw_conditions' write / wait."""
    source = condition_source(config, teacher)
    if source is None:
        return [], None
    if source == "images":
        spec = config.condition_images
        said = f"condition_images: {spec if isinstance(spec, str) else f'a list of {len(spec)} files'}"
        return config.condition_pairs(), said[:limits.MAX_NAME_CHARS]  # a manifest field
    if config.sample_prompts:
        raise ConfigError("sample_prompts: a run whose condition images are drawn shows its first drawn images with "
                          "their prompts in the sample grid; remove sample_prompts")
    prompts = list(config.prompts or teacher.default_prompts)
    if not prompts:
        raise ConfigError("prompts is empty and the teacher ships no default prompt list: nothing to draw from")
    with draw_with(source) as drawer:
        if drawer.needs_conditions:
            raise ConfigError(f"condition_teacher: {source} cannot sample from prompts alone either: name a "
                              "text-to-image teacher")
        pairs = draw_conditions(drawer, prompts, folder, config.seed, **draw)
    said = f"drawn by {'the teacher itself' if source == SELF else source} from the run's prompts"
    return pairs, said[:limits.MAX_NAME_CHARS]


def encode_run(config: TrainConfig, teacher: Teacher, pairs: list | None = None,
               source: str | None = None) -> RunConditioning:
    """The run's rows, encoded with the text encoders (and VAE) once: ``pairs`` (condition_pairs') with their
    images, or else the config's prompts."""
    if pairs:
        prompts = [prompt for _, prompt in pairs]
        with torch.no_grad():
            cond, uncond = encode_pairs(teacher, pairs)
        rows = slice(min(4, len(prompts)))
        return RunConditioning(prompts, cond, uncond, prompts[rows], tuple(select(c, rows) for c in (cond, uncond)),
                               len(pairs), source)
    prompts = list(config.prompts or teacher.default_prompts)
    if not prompts:
        raise ConfigError("prompts is empty and the teacher ships no default prompt list")
    extra = list(config.sample_prompts)  # without its own, the sample grid shows the first training prompts
    with torch.no_grad():  # every embedding of the run in one call: afterwards nothing needs the text encoders
        cond, uncond = teacher.encode(prompts + extra)
    sample_rows = slice(len(prompts), None) if extra else slice(min(4, len(prompts)))
    return RunConditioning(prompts, *(select(c, slice(len(prompts))) for c in (cond, uncond)),
                           extra or prompts[:4], tuple(select(c, sample_rows) for c in (cond, uncond)), 0)
