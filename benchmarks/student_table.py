"""The teacher next to its students on one eval: NFE, 4-image batch time, adherence, diversity, FD.

    OMP_NUM_THREADS=1 python benchmarks/student_table.py assets/students/phased assets/students/dmd-sgts ...

Every row uses the same prompts, images per prompt and seed (pdmd.builtin.evaluate); the 4-image time is the median
of 3 runs after a warm-up, sampling plus decoding. Prints a markdown table, then one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pdmd.builtin.evaluate import evaluate
from pdmd.media import save_grid
from pdmd.students.folder import load_student
from pdmd.teachers import load_teacher

BATCH_PROMPTS = ["a red circle on a dark background", "a blue star on a light background",
                 "a green triangle on a sky background", "a yellow square on a grey background"]


def batch_seconds(sample, min_repeats: int = 5, min_seconds: float = 3.0) -> float:
    """Median wall time of ``sample()``: at least ``min_repeats`` runs and ``min_seconds`` in all, so a fast
    student gets as many samples of the machine's noise as a slow teacher."""
    sample()  # warm-up: first calls allocate and pick kernels
    times = []
    while len(times) < min_repeats or sum(times) < min_seconds:
        started = time.perf_counter()
        sample()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def teacher_row(teacher, per_prompt: int, seed: int) -> dict:
    row = evaluate(teacher, seed=seed, per_prompt=per_prompt)
    row["four_image_seconds"] = batch_seconds(lambda: teacher.decode(teacher.sample(BATCH_PROMPTS, 0).sample))
    return {"name": f"teacher ({teacher.default_steps} steps, CFG {teacher.default_cfg:g})", **row}


def student_row(folder: Path, per_prompt: int, seed: int) -> dict:
    student = load_student(folder)
    teacher = student.roles.teacher
    row = evaluate(teacher, student.schedule, student.cfg, seed, per_prompt=per_prompt, experts=student.experts)
    row["four_image_seconds"] = batch_seconds(lambda: teacher.decode(student.sample(BATCH_PROMPTS, 0).sample))
    manifest = student.manifest
    return {"name": f"{manifest.method} ({manifest.updates_trained} updates)", **row}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+", type=Path, help="student folders")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, help="also draw 8 seeds of one prompt for every model to this PNG")
    parser.add_argument("--grid-prompt", default="a blue star on a light background")
    args = parser.parse_args()
    teacher = load_teacher("builtin")
    rows = [teacher_row(teacher, args.per_prompt, args.seed)]
    rows += [student_row(folder, args.per_prompt, args.seed) for folder in args.students]
    base = rows[0]
    print("| model | NFE | 4-image batch (s) | speed-up | adherence | diversity | position std | size std | FD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['nfe']} | {row['four_image_seconds']:.3f} | "
              f"{base['four_image_seconds'] / row['four_image_seconds']:.1f}x | {row['adherence']:.3f} | "
              f"{row['diversity']:.2f} | {row['position_spread']:.2f} | {row['size_spread']:.2f} | {row['fd']:.1f} |")
    for row in rows:
        print(json.dumps(row))
    if args.grid:
        prompts = [args.grid_prompt] * 8
        grid = [(rows[0]["name"], teacher.decode(teacher.sample(prompts, args.seed).sample))]
        for folder, row in zip(args.students, rows[1:]):
            student = load_student(folder)
            grid.append((row["name"], student.roles.teacher.decode(student.sample(prompts, args.seed).sample)))
        save_grid(grid, f'"{args.grid_prompt}", seeds 0-7', args.grid)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
