"""The teacher next to its students over several eval seeds: NFE, 4-image batch time, adherence, diversity, FD,
and each phased student's boundary fidelity.

    python benchmarks/student_table.py assets/students/phased assets/students/dmd-sgts ... [--seeds 0,1,2] [--threads 1]

Every row uses the same prompts, images per prompt and seeds (pdmd.builtin.evaluate); each quality figure is the
mean ± sample std over the eval seeds. "boundary FD t=..." is pdmd.builtin.evaluate.boundary_fidelity: the FD of
the images the teacher finishes (its own steps / phases per phase, its CFG) from the student's x_t at that
boundary -- how far the student's x_t is from the teacher's p_t, as the probe sees it. The 4-image time is the
median of at least 5 runs and 3 s after a warm-up, sampling plus decoding, measured once. Prints a markdown
table, then one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pdmd.builtin.evaluate import boundary_fidelity, evaluate, mean_and_std
from pdmd.media import save_grid
from pdmd.students.folder import load_student
from pdmd.teachers import load_teacher

BATCH_PROMPTS = ["a red circle on a dark background", "a blue star on a light background",
                 "a green triangle on a sky background", "a yellow square on a grey background"]
QUALITY = ("adherence", "diversity", "position_spread", "size_spread", "fd")


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


def boundary_key(t: float) -> str:
    return f"boundary FD t={t:g}"


def teacher_row(teacher, per_prompt: int, seeds: list[int]) -> dict:
    runs = [evaluate(teacher, seed=seed, per_prompt=per_prompt) for seed in seeds]
    row = {"name": f"teacher ({teacher.default_steps} steps, CFG {teacher.default_cfg:g})", "nfe": runs[0]["nfe"],
           **mean_and_std(runs, QUALITY)}
    row["four_image_seconds"] = batch_seconds(lambda: teacher.decode(teacher.sample(BATCH_PROMPTS, 0).sample))
    return row


def student_row(folder: Path, per_prompt: int, seeds: list[int]) -> dict:
    student = load_student(folder)
    teacher = student.roles.teacher
    runs = []
    for seed in seeds:
        with student.roles.active(None):
            run = evaluate(teacher, student.schedule, student.cfg, seed, per_prompt=per_prompt,
                           experts=student.experts)
        fidelity = boundary_fidelity(student, seed, per_prompt=per_prompt)
        runs.append({**run, **{boundary_key(t): fd for t, fd in fidelity.items()}})
    boundaries = [boundary_key(t) for t in student.schedule.boundaries]
    manifest = student.manifest
    row = {"name": f"{manifest.method} ({manifest.updates_trained} updates)", "nfe": runs[0]["nfe"],
           **mean_and_std(runs, (*QUALITY, *boundaries))}
    row["four_image_seconds"] = batch_seconds(lambda: teacher.decode(student.sample(BATCH_PROMPTS, 0).sample))
    return row


def plus_minus(value: tuple[float, float] | None, digits: int) -> str:
    return "–" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+", type=Path, help="student folders")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2", help="eval seeds, comma-separated (each is a full eval)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--grid", type=Path, help="also draw 8 seeds of one prompt for every model to this PNG")
    parser.add_argument("--grid-prompt", default="a blue star on a light background")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    teacher = load_teacher("builtin")
    rows = [teacher_row(teacher, args.per_prompt, seeds)]
    rows += [student_row(folder, args.per_prompt, seeds) for folder in args.students]
    boundaries = sorted({k for row in rows for k in row if k.startswith("boundary FD")},
                        key=lambda k: -float(k.rpartition("=")[2]))
    base = rows[0]
    print(f"{len(seeds)} eval seeds ({', '.join(map(str, seeds))}) × 12 prompts × {args.per_prompt} images; "
          "mean ± std over the seeds\n")
    header = ["model", "NFE", "4-image batch (s)", "speed-up", "adherence", "diversity", "position std", "size std",
              "FD", *boundaries]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for row in rows:
        cells = [row["name"], str(row["nfe"]), f"{row['four_image_seconds']:.3f}",
                 f"{base['four_image_seconds'] / row['four_image_seconds']:.1f}x", plus_minus(row["adherence"], 3),
                 plus_minus(row["diversity"], 2), plus_minus(row["position_spread"], 2),
                 plus_minus(row["size_spread"], 2), plus_minus(row["fd"], 1),
                 *(plus_minus(row.get(k), 1) for k in boundaries)]
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        print(json.dumps({"seeds": seeds, **row}))
    if args.grid:
        prompts = [args.grid_prompt] * 8
        grid = [(rows[0]["name"], teacher.decode(teacher.sample(prompts, seeds[0]).sample))]
        for folder, row in zip(args.students, rows[1:]):
            student = load_student(folder)
            grid.append((row["name"], student.roles.teacher.decode(student.sample(prompts, seeds[0]).sample)))
        save_grid(grid, f'"{args.grid_prompt}", seeds 0-7', args.grid)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
