"""``python -m pdmd <command>``: each command module exposes ``add_arguments(parser)`` and ``run(args)``."""
from __future__ import annotations

import argparse

from pdmd.commands import (
    bench_teacher,
    bench_train,
    evaluate,
    lab,
    lora,
    plan,
    push,
    sample,
    train,
    train_probe,
    train_teacher,
)

# command name -> (module, one-line help)
COMMANDS = {
    "lab": (lab, "2-D Gaussian-mixture lab: distil with every method and measure diversity"),
    "train-teacher": (train_teacher, "train (or resume) the built-in tiny teacher on generated scenes"),
    "train-probe": (train_probe, "train the metrics probe (adherence, diversity, FD) on generated scenes"),
    "eval": (evaluate, "generate with a teacher and measure adherence, diversity and FD"),
    "train": (train, "LoRA phased distillation of a teacher (one device, or many with accelerate launch)"),
    "plan": (plan, ("memory of a distillation run per component, from the teacher's config files alone; whether "
                    "it fits a GPU and the cheapest fix")),
    "sample": (sample, "render a prompt with a teacher, or with a student folder"),
    "lora": (lora, "import published LoRA files as a student; export a student for diffusers/ComfyUI"),
    "push": (push, "upload a student folder and its model card to the Hugging Face Hub"),
    "bench-train": (bench_train, ("time a generator step per phase, estimate the run's training time, compare its "
                                  "memory with teacher inference")),
    "bench-teacher": (bench_teacher, "time the built-in teacher, report its size, draw its sample grid"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pdmd", description="Phased DMD Studio")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


def main_exit() -> None:
    """The ``pdmd`` console script (``pip install -e .``)."""
    raise SystemExit(main())
