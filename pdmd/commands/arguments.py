"""argparse types shared by the commands: bad input exits 2 with the value and the rule named."""
from __future__ import annotations

import argparse

from pdmd import limits


def whole_number(low: int, high: int | None = None, unit: str = ""):
    """An argparse type: a whole number in [low, high] (bad input exits 2 with the value and the rule named)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} must be at most {high}{unit}")
        return value
    return parse


positive_int = whole_number(1)
seed = whole_number(0, limits.MAX_SEED)  # what torch.Generator and the app accept
pixels = whole_number(1, limits.MAX_SIDE, " pixels")
frames = whole_number(1, limits.MAX_FRAMES, " frames")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def teacher_lora(text: str):
    """argparse type: ``FILE[:STRENGTH][:NETWORK]``, a style LoRA fused into the teacher (strength in [0, 2],
    default 1; network transformer, the default, or transformer_2, Wan 2.2 A14B's low-noise one), as a checked
    pdmd.teachers.style_loras.StyleLora."""
    from pdmd.teachers.base import TeacherError
    from pdmd.teachers.style_loras import DEFAULT_NETWORK, NETWORKS, style_lora

    file, strength, network = text, 1.0, DEFAULT_NETWORK
    head, colon, tail = file.rpartition(":")
    if colon and head and tail in NETWORKS:
        file, network = head, tail
    head, colon, tail = file.rpartition(":")
    if colon and head:
        try:
            file, strength = head, float(tail)
        except ValueError:
            pass  # a colon that is part of the path
    try:
        return style_lora(file, strength, network=network)
    except TeacherError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


MAX_LAB_SEEDS = 10  # each seed reruns the whole lab (minutes on a CPU)


def seed_list(text: str) -> list[int]:
    """argparse type: seeds as a range '0-4' or a list '0,1,2' (or one seed), at most MAX_LAB_SEEDS, no repeats."""
    try:
        if "-" in text.strip().lstrip("-"):
            first, last = (int(part) for part in text.split("-"))
            if last < first:
                raise argparse.ArgumentTypeError(f"{text!r}: the range ends before it starts")
            if last - first >= MAX_LAB_SEEDS:  # checked before the list is built: '0-999999999' stays cheap
                raise argparse.ArgumentTypeError(f"{text!r} names {last - first + 1} seeds; at most {MAX_LAB_SEEDS}")
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed list; write a range like 0-4 or a list like "
                                         "0,1,2") from None
    if len(seeds) > MAX_LAB_SEEDS:
        raise argparse.ArgumentTypeError(f"{text!r} names {len(seeds)} seeds; at most {MAX_LAB_SEEDS}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a seed")
    for value in seeds:
        seed(str(value))  # each in [0, MAX_SEED], with that rule's message
    return seeds
