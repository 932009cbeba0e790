"""``python -m pdmd eval``: generate with a teacher (or a student) on the standard prompts and measure adherence,
diversity and FD with the probe."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from pdmd.builtin import scenes
from pdmd.builtin.evaluate import eval_prompts, evaluate
from pdmd.commands.arguments import non_negative_float, positive_float, positive_int, seed
from pdmd.core.schedule import PhaseSchedule
from pdmd.students import StudentError
from pdmd.students.folder import load_student
from pdmd.teachers import TEACHERS, load_teacher


def _prompt(text: str) -> str:
    try:
        scenes.parse_prompt(text)
    except scenes.PromptError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=TEACHERS, default="builtin", help="teacher to evaluate")
    parser.add_argument("--student", metavar="DIR", help="evaluate this student folder (on its teacher) instead")
    parser.add_argument("--steps", type=positive_int, default=None, help="Euler steps (default: the model's)")
    parser.add_argument("--cfg", type=non_negative_float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--shift", type=positive_float, default=None, help="timestep shift (default: the model's)")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--prompts", type=positive_int, default=12, help="how many standard eval prompts")
    parser.add_argument("--prompt", type=_prompt, action="append", default=None,
                        help="evaluate this prompt instead of the standard set (repeatable)")
    parser.add_argument("--per-prompt", type=positive_int, default=8, help="images per prompt")
    parser.add_argument("--quantize", choices=("none", "int8", "fp8"), default="none",
                        help="evaluate the teacher with its network quantized (torchao weight-only)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    experts = None
    if args.student:
        try:
            student = load_student(args.student)
            teacher = student.roles.teacher
        except (StudentError, ValueError) as err:
            print(f"python -m pdmd eval: error: {err}", file=sys.stderr)
            return 2
        schedule, experts = student.schedule, student.experts
        cfg = student.cfg if args.cfg is None else args.cfg
    else:
        teacher = load_teacher(args.model, quantize=args.quantize)
        schedule = PhaseSchedule.uniform(args.steps or teacher.default_steps,
                                         teacher.default_shift if args.shift is None else args.shift)
        cfg = teacher.default_cfg if args.cfg is None else args.cfg
    prompts = args.prompt or eval_prompts(args.prompts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(teacher, schedule, cfg, args.seed, prompts, args.per_prompt, experts=experts)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    result.update(model=args.student or args.model, schedule=schedule.as_dict(), cfg=cfg, seed=args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0
