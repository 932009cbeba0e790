"""``python -m pdmd bench-train --config FILE``: time per generator step in each phase, the whole run's training
time they imply, and training peak memory against the teacher's own inference peak (each measured in a fresh
process, so one does not inflate the other)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from pdmd.commands.arguments import positive_int


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure_inference(config_path: str) -> dict:
    from pdmd.teachers import load_teacher
    from pdmd.training.config import TrainConfig

    config = TrainConfig.from_yaml(config_path)
    teacher = load_teacher(config.teacher, device="cuda" if torch.cuda.is_available() else "cpu",
                           **config.teacher_options())
    prompts = list(teacher.default_prompts[: config.batch_size])
    started = time.perf_counter()
    teacher.sample(prompts, seed=0)
    return {"seconds": time.perf_counter() - started, "peak_mb": _peak_mb()}


def _measure_training(config_path: str, steps: int) -> dict:
    """Seconds per generator step in every phase (a later phase also rolls out through the earlier experts, so
    it costs more), each timed after one warm-up step at the phase's start."""
    from pdmd.training.config import TrainConfig
    from pdmd.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(TrainConfig.from_yaml(config_path, output_dir=folder))
        phase_starts = [sum(trainer.config.updates_per_phase[:k]) for k in range(len(trainer.config.updates_per_phase))]
        per_phase = []
        for start in phase_starts:
            trainer.step = start
            trainer.train_step()  # warm-up: the phase's fresh fake score and optimisers, first-call allocations
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            per_phase.append((time.perf_counter() - started) / steps)
        return {"seconds_per_step": per_phase, "updates_per_phase": list(trainer.config.updates_per_phase),
                "peak_mb": _peak_mb()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=positive_int, default=5, help="timed generator steps (after one warm-up)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads in both measurements")
    parser.add_argument("--part", choices=("inference", "training"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "inference":
        print(json.dumps(_measure_inference(args.config)))
        return 0
    if args.part == "training":
        print(json.dumps(_measure_training(args.config, args.steps)))
        return 0

    from pdmd.training.config import TrainConfig

    shortest = min(TrainConfig.from_yaml(args.config).updates_per_phase)
    if args.steps + 1 > shortest:  # the timed steps would run on into the next phase
        print(f"bench-train: --steps {args.steps} plus one warm-up step exceeds the shortest phase of {args.config} "
              f"({shortest} steps)", file=sys.stderr)
        return 2

    def child(part: str) -> dict:
        command = [sys.executable, "-m", "pdmd", "bench-train", "--config", args.config, "--steps", str(args.steps),
                   "--part", part] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    inference, training = child("inference"), child("training")
    print(json.dumps({
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "seconds_per_generator_step": [round(seconds, 4) for seconds in training["seconds_per_step"]],
        "estimated_training_minutes": round(
            sum(n * seconds for n, seconds in zip(training["updates_per_phase"], training["seconds_per_step"])) / 60, 1),
        "train_peak_mb": round(training["peak_mb"], 1), "teacher_inference_peak_mb": round(inference["peak_mb"], 1),
        "memory_ratio": round(training["peak_mb"] / inference["peak_mb"], 3),
    }))
    return 0
