"""Which phase costs a student its quality: the student with one phase at a time handed back to the teacher.

    python benchmarks/phase_swap.py assets/students/phased [--per-prompt 8] [--seed 0] [--threads 2]

For each phase k, the student's own experts run every other phase and the teacher (its own guidance, with
``--teacher-steps`` Euler steps) runs phase k, from the same noise. If handing phase k back recovers the
teacher's adherence or FD, phase k's expert is the one to train longer or differently (`python -m pdmd train
--from-student DIR --start-phase K` retrains a later phase alone). As a reference, the teacher also runs every
phase itself with phase k cut to the student's step count: what those few steps cost even the teacher. The
hand-over is ``Student.with_teacher_phases`` (pdmd.students.folder); the app's Compare tab does the same per
image. Prints a markdown table, then one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pdmd.builtin.evaluate import evaluate
from pdmd.core.schedule import PhaseSchedule
from pdmd.students.folder import load_student

COLUMNS = ("adherence", "diversity", "position_spread", "size_spread", "fd")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path, help="a student folder of the built-in teacher")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="teacher Euler steps in the phase it takes over (default: its steps / phases)")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    student = load_student(args.student)
    teacher, schedule = student.roles.teacher, student.schedule
    teacher_steps = args.teacher_steps or student.teacher_steps_per_phase()

    def student_with_teacher(phases) -> dict:
        hybrid, experts, cfg = student.with_teacher_phases(phases, teacher_steps=teacher_steps)
        with student.roles.active(None):
            return evaluate(teacher, hybrid, cfg, args.seed, per_prompt=args.per_prompt, experts=experts)

    rows = [("student", student_with_teacher(()))]
    rows += [(f"phase {k + 1} by the teacher ({teacher_steps} steps, CFG {teacher.default_cfg:g})",
              student_with_teacher([k])) for k in range(schedule.num_phases)]
    with student.roles.active(None):  # the plain teacher from here on
        for k in range(schedule.num_phases):  # the reference: what the student's step count costs the teacher itself
            steps = [teacher_steps] * schedule.num_phases
            steps[k] = schedule.steps[k]
            rows.append((f"teacher, phase {k + 1} in the student's {steps[k]} step{'s' * (steps[k] != 1)}",
                         evaluate(teacher, PhaseSchedule(schedule.boundaries, tuple(steps), schedule.shift),
                                  seed=args.seed, per_prompt=args.per_prompt)))
        rows.append((f"teacher ({teacher.default_steps} steps, CFG {teacher.default_cfg:g})",
                     evaluate(teacher, seed=args.seed, per_prompt=args.per_prompt)))

    print(f"{args.student}: {schedule.describe()}, {rows[0][1]['images']} images, seed {args.seed}\n")
    print("| sampler | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    for name, row in rows:
        print(json.dumps({"name": name, **{c: row[c] for c in COLUMNS}, "images": row["images"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
