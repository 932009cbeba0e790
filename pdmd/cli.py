"""``python -m pdmd <command>``: each command module exposes ``add_arguments(parser)`` and ``run(args)``.

A command's module is imported only when that command runs (or for ``--help``): the modules pull in torch,
diffusers and peft, seconds of imports that ``python -m pdmd lab`` or ``plan`` should not pay for the others."""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module in pdmd.commands, one-line help)
COMMANDS = {
    "lab": ("lab", "2-D Gaussian-mixture lab: distil with every method and measure diversity"),
    "train-teacher": ("train_teacher", "train (or resume) the built-in tiny teacher on generated scenes"),
    "train-probe": ("train_probe", "train the metrics probe (adherence, diversity, FD) on generated scenes"),
    "eval": ("evaluate", "generate with a teacher and measure adherence, diversity and FD"),
    "train": ("train", "LoRA phased distillation of a teacher (one device, or many with accelerate launch)"),
    "plan": ("plan", ("memory of a distillation run per component, from the teacher's config files alone; whether "
                      "it fits a GPU and the cheapest fix")),
    "sample": ("sample", "render a prompt with a teacher, or with a student folder"),
    "lora": ("lora", "import published LoRA files as a student; export a student for diffusers/ComfyUI"),
    "push": ("push", "upload a student folder and its model card to the Hugging Face Hub"),
    "bench-train": ("bench_train", ("time a generator step per phase, estimate the run's training time, compare "
                                    "its memory with teacher inference")),
    "bench-teacher": ("bench_teacher", "time the built-in teacher, report its size, draw its sample grid"),
}


def build_parser(only: str | None) -> argparse.ArgumentParser:
    """The commands with their help lines, and the arguments of ``only`` (the command named, if any): its module
    is the one imported. Without one, parsing stops at the command anyway (--help, or an unknown name)."""
    parser = argparse.ArgumentParser(prog="python -m pdmd", description="Phased DMD Studio")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            module = importlib.import_module(f"pdmd.commands.{module_name}")
            module.add_arguments(command)
            command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    named = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(named).parse_args(argv)
    return args.run(args) or 0


def main_exit() -> None:
    """The ``pdmd`` console script (``pip install -e .``)."""
    raise SystemExit(main())
