"""``python -m pdmd <command>``: each command module exposes ``add_arguments(parser)`` and ``run(args)``."""
from __future__ import annotations

import argparse
import importlib

from pdmd import limits

# command name -> (module, one-line help)
COMMANDS = {
    "lab": ("pdmd.commands.lab", "2-D Gaussian-mixture lab: distil with every method and measure diversity"),
    "train-teacher": ("pdmd.commands.train_teacher", "train (or resume) the built-in tiny teacher on generated scenes"),
    "train-probe": ("pdmd.commands.train_probe", "train the metrics probe (adherence, diversity, FD) on generated scenes"),
    "eval": ("pdmd.commands.evaluate", "generate with a teacher and measure adherence, diversity and FD"),
    "train": ("pdmd.commands.train", "LoRA phased distillation of a teacher (one device, or many with accelerate launch)"),
    "sample": ("pdmd.commands.sample", "render a prompt with a teacher, or with a student folder"),
    "lora": ("pdmd.commands.lora", "import published LoRA files as a student; export a student for diffusers/ComfyUI"),
    "bench-train": ("pdmd.commands.bench_train", ("time a generator step per phase, estimate the run's training time, "
                                         "compare its memory with teacher inference")),
    "bench-teacher": ("pdmd.commands.bench_teacher", "time the built-in teacher, report its size, draw its sample grid"),
}


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (bad input exits 2 with the value named)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def seed(text: str) -> int:
    """argparse type: a seed, a whole number from 0 to 2**31 - 1 (what torch.Generator and the app accept)."""
    value = non_negative_int(text)
    if value > limits.MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} must be at most {limits.MAX_SEED}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


def pixels(text: str) -> int:
    """argparse type: a height or width, 1 .. MAX_SIDE."""
    value = positive_int(text)
    if value > limits.MAX_SIDE:
        raise argparse.ArgumentTypeError(f"{value} must be at most {limits.MAX_SIDE} pixels")
    return value


def frames(text: str) -> int:
    """argparse type: a video's frame count, 1 .. MAX_FRAMES."""
    value = positive_int(text)
    if value > limits.MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"{value} must be at most {limits.MAX_FRAMES} frames")
    return value


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pdmd", description="Phased DMD Studio")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(command)
        command.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


def main_exit() -> None:
    """The ``pdmd`` console script (``pip install -e .``)."""
    raise SystemExit(main())
