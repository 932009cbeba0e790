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
    "push": ("pdmd.commands.push", "upload a student folder and its model card to the Hugging Face Hub"),
    "bench-train": ("pdmd.commands.bench_train", ("time a generator step per phase, estimate the run's training time, "
                                         "compare its memory with teacher inference")),
    "plan": ("pdmd.commands.plan", ("memory of a distillation run per component, from the teacher's config files "
                                     "alone; whether it fits a GPU and the cheapest fix")),
    "bench-teacher": ("pdmd.commands.bench_teacher", "time the built-in teacher, report its size, draw its sample grid"),
}


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
