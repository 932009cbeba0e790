"""The "fits on 24 / 48 / 80 GB?" table of docs/benchmarks.md: ``plan`` for every shipped public checkpoint at a
typical size per family, bf16 or int8 base, gradient checkpointing on or off, 1 GPU or FSDP2 over 2/4/8.

Each cell is the fewest GPUs (of 1, 2, 4, 8) on which the plan's peak fits that budget per GPU. One row is the
same computation as

    python -m pdmd plan --teacher ID --height H --width W [--num-frames F] --batch-size 1 --device cuda \\
        --dtype bf16 [--quantize int8] --gradient-checkpointing true|false --processes N --fast --json

run in one process so the traces are shared (--fast: pdmd/plan/stacks.py). Rows are appended to --cache as they
are computed, so an interrupted run continues where it stopped.

    python benchmarks/fits_table.py --cache runs/fits.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SIZES = {"Wan-AI": dict(height=480, width=832, num_frames=81)}  # by owner; images at 1024x1024
BUDGETS_GIB = (24, 48, 80)
PROCESSES = (1, 2, 4, 8)
GIB = 2**30


def size_of(checkpoint: str) -> dict:
    return SIZES.get(checkpoint.split("/")[0], dict(height=1024, width=1024))


def planned_peak(checkpoint: str, quantize: str, checkpointing: bool, processes: int) -> int:
    from pdmd.plan.memory import PlanSettings
    from pdmd.plan.planner import plan
    from pdmd.training.config import TrainConfig

    config = TrainConfig.from_dict(dict(teacher=checkpoint, batch_size=1, **size_of(checkpoint)))
    settings = PlanSettings.from_config(config, dtype="bf16", quantize=quantize, device="cuda",
                                        gradient_checkpointing=checkpointing, processes=processes)
    return plan(settings, None, fast=True)["peak_bytes"]


def fewest_gpus(peaks: dict[int, int], budget: int) -> str:
    for processes in PROCESSES:
        if peaks[processes] <= budget:
            return "1 GPU" if processes == 1 else f"FSDP x{processes}"
    return "no"


def main(argv: list[str] | None = None) -> int:
    import torch

    from pdmd.plan.architectures import shipped_checkpoints

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/fits.jsonl", help="JSON lines of computed peaks")
    parser.add_argument("--checkpoints", nargs="+", default=None, help="default: every shipped one")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            done[(row["checkpoint"], row["quantize"], row["checkpointing"], row["processes"])] = row["peak_bytes"]
    lines = ["| checkpoint | size | base | checkpointing | peak on 1 GPU (GiB) | 24 GiB | 48 GiB | 80 GiB |",
             "|---|---|---|---|---:|---|---|---|"]
    for checkpoint in args.checkpoints or shipped_checkpoints():
        size = size_of(checkpoint)
        label = f"{size['height']}x{size['width']}" + (f"x{size['num_frames']}" if "num_frames" in size else "")
        for quantize in ("none", "int8"):
            for checkpointing in (True, False):
                peaks = {}
                for processes in PROCESSES:
                    key = (checkpoint, quantize, checkpointing, processes)
                    if key not in done:
                        done[key] = planned_peak(*key)
                        with cache.open("a") as f:
                            f.write(json.dumps(dict(zip(("checkpoint", "quantize", "checkpointing", "processes"),
                                                        key), peak_bytes=done[key])) + "\n")
                    peaks[processes] = done[key]
                cells = [fewest_gpus(peaks, budget * GIB) for budget in BUDGETS_GIB]
                base = "bf16" if quantize == "none" else "int8"
                lines.append(f"| {checkpoint} | {label} | {base} | {'on' if checkpointing else 'off'} | "
                             f"{peaks[1] / GIB:.1f} | " + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
