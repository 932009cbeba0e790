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
