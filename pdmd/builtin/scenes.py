"""The built-in teacher's world: 32x32 RGB scenes of one coloured shape on a background, made on the fly.

Every scene has three attributes (colour, shape, background) named by its prompt, e.g. "a red triangle on a
dark background", and free nuisance factors (position, size, rotation, background gradient, small colour
jitter): many different valid images per prompt, which is the diversity a distilled student must keep.

Conditioning is one class id over (colour | none) x (shape | none) x (background | none), so a prompt that
names only some attributes, or none (the unconditional branch of CFG), is a class of its own.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

IMAGE_SIZE = 32

# name -> RGB in [0, 1]; saturated, so every colour stands out on every background
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.96, 0.88, 0.10),
    "green": (0.12, 0.72, 0.20),
    "blue": (0.12, 0.28, 0.95),
    "purple": (0.58, 0.16, 0.80),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "dark": (0.08, 0.08, 0.10),
    "light": (0.90, 0.90, 0.87),
    "grey": (0.50, 0.50, 0.50),
    "sky": (0.60, 0.80, 0.95),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)

# Nuisance ranges, in pixels of the 32x32 image. Shapes stay 1 px inside the frame so the frame shows the
# background (metrics.foreground_mask relies on it).
RADIUS_RANGE = (6.0, 11.0)
MARGIN = 1.0
MAX_GRADIENT = 0.08  # half the brightness change across the image
COLOUR_JITTER = 0.04
SUPERSAMPLE = 3  # anti-aliasing: render at 3x and average

# Words a prompt may use besides the attribute names: articles, fillers, synonyms.
FILLER_WORDS = {"a", "an", "the", "on", "in", "of", "with", "background", "backdrop", "shape", "one", "and",
                "over", "against", "coloured", "colored", "image", "picture", "photo"}
SYNONYMS = {"gray": "grey", "violet": "purple", "black": "dark", "white": "light", "circles": "circle",
            "squares": "square", "triangles": "triangle", "stars": "star", "disc": "circle", "disk": "circle",
            "round": "circle", "box": "square"}


class PromptError(ValueError):
    """A prompt that names two different values for one attribute (e.g. "a red blue circle")."""


@dataclass(frozen=True)
class Attributes:
    """Indices into COLOUR_NAMES / SHAPES / BACKGROUND_NAMES; None = not specified."""

    colour: int | None = None
    shape: int | None = None
    background: int | None = None

    @property
    def class_id(self) -> int:
        return class_id(self.colour, self.shape, self.background)

    @property
    def prompt(self) -> str:
        return prompt_for(self.colour, self.shape, self.background)


@dataclass(frozen=True)
class ParseResult:
    attributes: Attributes
    unknown: tuple[str, ...]  # words the grammar does not know; reported, never silently used

    @property
    def class_id(self) -> int:
        return self.attributes.class_id


def parse_prompt(text: str) -> ParseResult:
    """Free text -> attributes. Unknown words are listed in ``.unknown``; an empty prompt is unconditional."""
    found: dict[str, int] = {}
    unknown = []
    for word in re.findall(r"[a-z]+", text.lower()):
        word = SYNONYMS.get(word, word)
        if word in COLOURS:
            kind, index = "colour", COLOUR_NAMES.index(word)
        elif word in SHAPES:
            kind, index = "shape", SHAPES.index(word)
        elif word in BACKGROUNDS:
            kind, index = "background", BACKGROUND_NAMES.index(word)
        elif word in FILLER_WORDS:
            continue
        else:
            unknown.append(word)
            continue
        if found.get(kind, index) != index:
            raise PromptError(f"prompt {text!r} names two different {kind}s")
        found[kind] = index
    return ParseResult(Attributes(**found), tuple(unknown))


def prompt_for(colour: int | None, shape: int | None, background: int | None) -> str:
    """The canonical prompt of an attribute triple, e.g. "a red triangle on a dark background"."""
    words = ([COLOUR_NAMES[colour]] if colour is not None else []) + [SHAPES[shape] if shape is not None
                                                                       else "shape"]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if background is not None:
        text += f" on a {BACKGROUND_NAMES[background]} background"
    return text if (colour, shape, background) != (None, None, None) else ""


# --- class ids over the product space with "none" ----------------------------------------------------
_NUM = (len(COLOURS) + 1, len(SHAPES) + 1, len(BACKGROUNDS) + 1)
NUM_CLASSES = _NUM[0] * _NUM[1] * _NUM[2]


def class_id(colour: int | None, shape: int | None, background: int | None) -> int:
    """Index of an attribute triple; "none" is the last value of each attribute, so all-none is the last id."""
    c = len(COLOURS) if colour is None else colour
    s = len(SHAPES) if shape is None else shape
    b = len(BACKGROUNDS) if background is None else background
    return (c * _NUM[1] + s) * _NUM[2] + b


UNCONDITIONAL_CLASS = class_id(None, None, None)


def class_ids(colour: Tensor, shape: Tensor, background: Tensor) -> Tensor:
    """Vectorised class_id; each tensor holds indices, with -1 meaning "none"."""
    c = torch.where(colour < 0, len(COLOURS), colour)
    s = torch.where(shape < 0, len(SHAPES), shape)
    b = torch.where(background < 0, len(BACKGROUNDS), background)
    return (c * _NUM[1] + s) * _NUM[2] + b


def drop_attributes(labels: dict[str, Tensor], generator: torch.Generator, attribute_drop: float = 0.2,
                    all_drop: float = 0.1) -> Tensor:
    """Training-time condition dropout -> class ids: each attribute is forgotten with ``attribute_drop``,
    everything with ``all_drop``, so partial prompts and the unconditional branch are both learned."""
    n = labels["colour"].shape[0]
    forget_all = torch.rand(n, generator=generator) < all_drop
    kept = []
    for name in ("colour", "shape", "background"):
        forget = forget_all | (torch.rand(n, generator=generator) < attribute_drop)
        kept.append(torch.where(forget, -1, labels[name]))
    return class_ids(*kept)


# --- rendering ---------------------------------------------------------------------------------------
def _star_shaped_polygon(shape: str) -> tuple[int, list[float]]:
    """(vertex count, radius of each vertex relative to the circumradius), vertices evenly spaced in angle."""
    return {"circle": (48, [1.0]), "square": (4, [1.0]), "triangle": (3, [1.0]),
            "star": (10, [1.0, 0.45])}[shape]


def _inside(rho: Tensor, theta: Tensor, radius: Tensor, rotation: Tensor, shape: str) -> Tensor:
    """Whether polar points (relative to the shape centre) lie inside the shape; (B, P) booleans.

    Every shape here is star-shaped about its centre, so its boundary is a radius per angle: along direction
    theta it is where the ray meets the edge between the two neighbouring vertices A, B.
    """
    count, radii = _star_shaped_polygon(shape)
    radii = torch.tensor(radii, device=rho.device)
    step = 2 * math.pi / count
    local = (theta - rotation[:, None]) % (2 * math.pi)
    k = torch.floor(local / step)
    rel_a = radii[(k.long() % len(radii))]
    rel_b = radii[((k.long() + 1) % len(radii))]
    a_angle, b_angle = k * step, (k + 1) * step
    ax, ay = rel_a * torch.cos(a_angle), rel_a * torch.sin(a_angle)
    bx, by = rel_b * torch.cos(b_angle), rel_b * torch.sin(b_angle)
    ex, ey = bx - ax, by - ay
    # boundary distance along d = (cos, sin): cross(A, E) / cross(d, E)
    boundary = (ax * ey - ay * ex) / (torch.cos(local) * ey - torch.sin(local) * ex)
    return rho <= boundary * radius[:, None]


def sample_labels(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random attributes and nuisances for n scenes."""
    radius = RADIUS_RANGE[0] + (RADIUS_RANGE[1] - RADIUS_RANGE[0]) * torch.rand(n, generator=generator)
    # keep the whole shape (radius <= circumradius) inside the frame
    span = IMAGE_SIZE - 2 * (radius + MARGIN)
    return {
        "colour": torch.randint(len(COLOURS), (n,), generator=generator),
        "shape": torch.randint(len(SHAPES), (n,), generator=generator),
        "background": torch.randint(len(BACKGROUNDS), (n,), generator=generator),
        "radius": radius,
        "cx": radius + MARGIN + span * torch.rand(n, generator=generator),
        "cy": radius + MARGIN + span * torch.rand(n, generator=generator),
        "rotation": 2 * math.pi * torch.rand(n, generator=generator),
        "gradient": MAX_GRADIENT * torch.rand(n, generator=generator),
        "gradient_angle": 2 * math.pi * torch.rand(n, generator=generator),
        "jitter": COLOUR_JITTER * (2 * torch.rand(n, 2, 3, generator=generator) - 1),  # shape, background
    }


def render(labels: dict[str, Tensor]) -> Tensor:
    """Labels (as from sample_labels) -> images (B, 3, 32, 32) in [0, 1], on the labels' device."""
    n, device = labels["colour"].shape[0], labels["cx"].device
    size, fine = IMAGE_SIZE, IMAGE_SIZE * SUPERSAMPLE
    # pixel-centre coordinates of the supersampled grid, in units of output pixels
    axis = (torch.arange(fine, device=device) + 0.5) / SUPERSAMPLE
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    dx = gx.reshape(1, -1) - labels["cx"][:, None]
    dy = gy.reshape(1, -1) - labels["cy"][:, None]
    rho, theta = torch.hypot(dx, dy), torch.atan2(dy, dx)
    coverage = torch.zeros(n, fine * fine, device=device)
    for index, shape in enumerate(SHAPES):
        rows = labels["shape"] == index
        if rows.any():
            coverage[rows] = _inside(rho[rows], theta[rows], labels["radius"][rows], labels["rotation"][rows],
                                     shape).float()
    coverage = torch.nn.functional.avg_pool2d(coverage.reshape(n, 1, fine, fine), SUPERSAMPLE)

    background = torch.tensor(list(BACKGROUNDS.values()), device=device)[labels["background"]] + labels["jitter"][:, 1]
    colour = torch.tensor(list(COLOURS.values()), device=device)[labels["colour"]] + labels["jitter"][:, 0]
    # a soft linear gradient across the background, centred so its mean stays the named tint
    axis = (torch.arange(size, device=device) + 0.5) / size - 0.5
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    direction = (torch.cos(labels["gradient_angle"])[:, None, None] * xx
                 + torch.sin(labels["gradient_angle"])[:, None, None] * yy)
    shade = 2 * labels["gradient"][:, None, None] * direction
    canvas = background[:, :, None, None] + shade[:, None]
    image = canvas * (1 - coverage) + colour[:, :, None, None] * coverage
    return image.clamp(0, 1)


def make_batch(n: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """n scenes, the same for the same seed: images (n, 3, 32, 32) in [0, 1] and their labels."""
    labels = sample_labels(n, torch.Generator().manual_seed(seed))
    return render(labels), labels


def prompts_of(labels: dict[str, Tensor]) -> list[str]:
    return [prompt_for(int(c), int(s), int(b))
            for c, s, b in zip(labels["colour"], labels["shape"], labels["background"])]


def labels_for_prompt(attributes: Attributes, n: int, seed: int) -> dict[str, Tensor]:
    """Random scenes that fit a (possibly partial) prompt: the unspecified attributes stay random."""
    labels = sample_labels(n, torch.Generator().manual_seed(seed))
    for name in ("colour", "shape", "background"):
        value = getattr(attributes, name)
        if value is not None:
            labels[name] = torch.full((n,), value)
    return labels
