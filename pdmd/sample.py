"""``python -m pdmd sample``: render one prompt with a teacher, or with a student folder on top of its teacher."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pdmd.cli import non_negative_float, positive_int
from pdmd.experts import StudentError, load_student
from pdmd.images import save_png
from pdmd.schedule import PhaseSchedule
from pdmd.teachers import load_teacher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=None, help="teacher id (default: the student's, else 'builtin')")
    parser.add_argument("--student", help="student folder (manifest.json + one LoRA per phase)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=positive_int, help="teacher steps (default: the teacher's)")
    parser.add_argument("--cfg", type=non_negative_float, help="guidance (default: the teacher's or the student's)")
    parser.add_argument("--out", required=True, help="output PNG")


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"python -m pdmd sample: error: {message}", file=sys.stderr)
        return 2

    try:
        if args.student:
            student = load_student(args.student, load_teacher(args.teacher) if args.teacher else None)
            teacher, schedule, cfg, experts = student.roles.teacher, student.schedule, student.cfg, student.experts
        else:
            teacher = load_teacher(args.teacher or "builtin")
            schedule = PhaseSchedule.uniform(args.steps or teacher.default_steps, teacher.default_shift)
            cfg, experts = teacher.default_cfg, None
    except (StudentError, ValueError, OSError) as err:
        return fail(str(err))
    cfg = cfg if args.cfg is None else args.cfg
    with torch.no_grad():
        result = teacher.sample([args.prompt], args.seed, schedule, cfg, experts)
    save_png(teacher.decode(result.sample), Path(args.out))
    print(json.dumps({"out": args.out, "nfe": result.nfe, "seed": args.seed, "schedule": schedule.as_dict()}))
    return 0
