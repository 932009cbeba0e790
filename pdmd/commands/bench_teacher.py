"""``python -m pdmd bench-teacher``: the built-in teacher's speed and size figures, and its sample grid.

Prints the wall time of a 4-image batch at the teacher's default steps / CFG (median of several runs after a
warm-up), the NFE, and the size of all shipped weights; ``--grid`` also draws prompts x seeds to a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from pdmd.builtin import scenes
from pdmd.builtin.evaluate import eval_prompts, measure
from pdmd.builtin.metrics import PROBE_DIR, load_probe
from pdmd.media import save_grid
from pdmd.teachers.builtin import ASSET_DIR, load_builtin_teacher

GRID_PROMPTS = (
    "a red circle on a dark background",
    "a blue star on a light background",
    "a green triangle on a sky background",
    "a yellow square on a grey background",
    "an orange star on a dark background",
    "a purple triangle on a light background",
    "a star",
    "",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grid", type=Path, default=None, help="write a prompts x 8 seeds sample grid here")
    parser.add_argument("--reference", action="store_true",
                        help="also print the metrics of dataset images for the standard eval prompts")


def shipped_megabytes() -> float:
    files = [f for folder in (ASSET_DIR, PROBE_DIR) for f in folder.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def dataset_reference(prompts: int = 12, per_prompt: int = 8, seed: int = 0) -> dict:
    """The eval metrics of real scenes: the ceiling a generator's numbers are read against."""
    names = eval_prompts(prompts)
    groups = [scenes.render(scenes.labels_for_prompt(scenes.parse_prompt(p).attributes, per_prompt,
                                                     seed * 100_003 + i)) for i, p in enumerate(names)]
    return measure(groups, names, load_probe())


def draw_grid(teacher, path: Path, seeds: int = 8) -> None:
    rows = [(f'"{prompt}"' if prompt else "(empty prompt: unconditional)",
             teacher.decode(teacher.sample([prompt] * seeds, seed=0).sample)) for prompt in GRID_PROMPTS]
    save_grid(rows, f"built-in teacher, {teacher.default_steps} steps, CFG {teacher.default_cfg:g}, "
                    f"seeds 0-{seeds - 1}", path)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    teacher = load_builtin_teacher()
    prompts = list(GRID_PROMPTS[:args.batch]) + [GRID_PROMPTS[0]] * max(0, args.batch - len(GRID_PROMPTS))
    teacher.sample(prompts, seed=0)  # warm-up: first calls allocate and pick kernels
    times = []
    for seed in range(args.repeats):
        began = time.perf_counter()
        result = teacher.sample(prompts, seed=seed)
        teacher.decode(result.sample)
        times.append(time.perf_counter() - began)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{args.batch}-image batch, {teacher.default_steps} steps, CFG {teacher.default_cfg:g}, "
          f"shift {teacher.default_shift:g}, NFE {result.nfe}: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeats} runs)")
    print(f"shipped weights (teacher + probe): {shipped_megabytes():.2f} MB")
    if args.reference:
        print(f"dataset images, standard eval prompts: {json.dumps(dataset_reference())}")
    if args.grid:
        draw_grid(teacher, args.grid)
        print(f"grid written to {args.grid}")
    return 0
