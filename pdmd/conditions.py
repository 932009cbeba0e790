"""Condition images: the per-sample image a conditioned teacher (image-to-video, editing) takes beside its prompt.

Every image -- a training run's ``condition_images``, ``--image FILE`` on the command line, a visitor's upload --
is read through ``open_image``, which decides from the file's size and its header alone (before a pixel is
decoded) whether it is an image this program takes: PNG, JPEG or WebP, at most ``MAX_IMAGE_PIXELS`` pixels and
``MAX_IMAGE_BYTES`` bytes, then decodes it in full, so a truncated file fails here and not inside a network.
Each refusal is one line naming the file. ``fit`` scales an image to cover the teacher's size and crops the
centre (the aspect kept, nothing stretched); ``condition_set`` pairs a folder or list of images with prompts --
an image per prompt, or for a teacher that composes several (Qwen-Image-Edit-Plus) a folder of folders, each
holding one prompt's images.
"""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pdmd.limits import MAX_CONDITION_IMAGES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

FORMATS = ("PNG", "JPEG", "WEBP")
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PROMPTS_FILE = "prompts.txt"  # beside a folder's images: one prompt per image, in the images' sorted order


class ConditionError(ValueError):
    """A condition image or its pairing with prompts is unusable; the message names the file."""


def open_image(path: str | Path):
    """The image at ``path`` as an RGB PIL image, or ConditionError saying why not."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConditionError(f"{path}: no such image file")
    size = path.stat().st_size
    if size == 0:
        raise ConditionError(f"{path}: the file is empty")
    if size > MAX_IMAGE_BYTES:
        raise ConditionError(f"{path}: {size / 2**20:.0f} MB, more than the {MAX_IMAGE_BYTES // 2**20} MB an image "
                             "may have")
    try:
        with warnings.catch_warnings():  # PIL warns of big images itself; the limit below is ours and lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
    except UnidentifiedImageError:
        raise ConditionError(f"{path}: not an image this program reads ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:  # PIL's own refusal, far above ours
        raise ConditionError(f"{path}: more pixels than the {MAX_IMAGE_PIXELS:,} an image may have") from None
    except (OSError, SyntaxError, ValueError) as err:  # a header cut short or corrupt
        raise ConditionError(f"{path}: the image data is damaged or cut short ({err})") from None
    with image:
        if image.format not in FORMATS:
            raise ConditionError(f"{path}: a {image.format} image; use {', '.join(FORMATS)}")
        width, height = image.size
        if width < 1 or height < 1:
            raise ConditionError(f"{path}: the image has no pixels ({width}x{height})")
        if width * height > MAX_IMAGE_PIXELS:
            raise ConditionError(f"{path}: {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} an image "
                                 "may have")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
            raise ConditionError(f"{path}: the image data is damaged or cut short ({err})") from None
        return image.convert("RGB")


def fit(image, height: int, width: int) -> Tensor:
    """``image`` scaled to cover ``height`` x ``width`` (bicubic) and cropped at its centre: (3, H, W) in [0, 1]."""
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    covered = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (covered.width - width) // 2, (covered.height - height) // 2
    pixels = np.asarray(covered.crop((left, top, left + width, top + height)))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


Row = Path | tuple[Path, ...]  # one prompt's image, or its several images in order


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())


def image_rows(spec: str | Path | list) -> list[Row]:
    """One row per prompt: a folder's images (sorted by name), or, where it holds folders and no image, each
    folder's images (the folders and their images by name); or a list whose items are files or lists of files.
    Every file must exist, and every row have as many images."""
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        folder = Path(spec)
        rows = _images_in(folder)
        if not rows:
            groups = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            rows = [tuple(_images_in(group)) for group in groups]
            empty = [group for group, row in zip(groups, rows) if not row]
            if empty:
                raise ConditionError(f"{empty[0]}: no {', '.join(SUFFIXES)} images in the folder")
        if not rows:
            raise ConditionError(f"{spec}: no {', '.join(SUFFIXES)} images in the folder, nor folders of them")
    else:
        items = [spec] if isinstance(spec, (str, Path)) else list(spec)
        if not items:
            raise ConditionError("condition_images is an empty list")
        rows = [tuple(Path(p) for p in item) if isinstance(item, (list, tuple)) else Path(item) for item in items]
        for row in rows:
            for path in row if isinstance(row, tuple) else (row,):
                if not path.is_file():
                    raise ConditionError(f"{path}: no such image file")
            if isinstance(row, tuple) and not row:
                raise ConditionError("condition_images lists an empty list of files")
    counts = sorted({len(row) if isinstance(row, tuple) else 1 for row in rows})
    if len(counts) > 1:
        raise ConditionError(f"condition_images: every prompt needs as many images (the rows have {counts})")
    if len(rows) * counts[0] > MAX_CONDITION_IMAGES:
        raise ConditionError(f"{len(rows) * counts[0]} condition images, more than the {MAX_CONDITION_IMAGES} a "
                             "run may have")
    return rows


def open_row(row: Row):
    """A row's image, or its images as a tuple, each read by open_image."""
    return tuple(open_image(path) for path in row) if isinstance(row, tuple) else open_image(row)


def condition_set(spec: str | Path | list, prompts: list[str] | None = None) -> list[tuple[Row, str]]:
    """(image file(s), prompt) pairs: a folder's ``prompts.txt`` gives one line per row (an image, or a folder of
    them); otherwise ``prompts`` are cycled over the rows. Every image is opened and checked here, so a bad one stops
    the run before it starts."""
    files = image_rows(spec)
    beside = Path(spec) / PROMPTS_FILE if isinstance(spec, (str, Path)) and Path(spec).is_dir() else None
    if beside is not None and beside.is_file():
        lines = [line.strip() for line in beside.read_text().splitlines() if line.strip()]
        if len(lines) != len(files):
            raise ConditionError(f"{beside}: {len(lines)} prompts for {len(files)} images (one line per image, in "
                                 "the images' name order)" if not isinstance(files[0], tuple) else
                                 f"{beside}: {len(lines)} prompts for {len(files)} folders of images (one line per "
                                 "folder, in name order)")
        paired = lines
    elif prompts:
        paired = list(itertools.islice(itertools.cycle(prompts), len(files)))
    else:
        raise ConditionError(f"no prompts for the condition images: write {PROMPTS_FILE} beside them or give "
                             "prompts")
    for row in files:
        for path in row if isinstance(row, tuple) else (row,):
            open_image(path).close()
    return list(zip(files, paired))
