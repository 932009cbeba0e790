"""``python -m pdmd bench-train --config FILE``: time per generator step in each phase, the whole run's training
time they imply, and training peak memory against the teacher's own inference peak (each measured in a fresh
process, so one does not inflate the other).

``--profile`` breaks one generator update of each phase into its parts (the trainer's ``record_function``
labels, read with torch.profiler), adds the checkpoint and sample-grid I/O per update at the config's
intervals, and sets the update's FLOPs (torch's FlopCounterMode) against this device's measured matmul
throughput: the floor no scheduling could beat."""
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
        for phase, start in enumerate(phase_starts):
            trainer.step = start + trainer.config.warm_start_updates(phase)  # DMD updates (a warm start's are cheaper)
            trainer.train_step()  # warm-up: the phase's fresh fake score and optimisers, first-call allocations
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            per_phase.append((time.perf_counter() - started) / steps)
        return {"seconds_per_step": per_phase, "updates_per_phase": list(trainer.config.updates_per_phase),
                "peak_mb": _peak_mb()}


LABELS = ("fake/rollout", "fake/forward", "fake/backward", "fake/optimizer", "generator/rollout",
          "generator/real score", "generator/fake score", "generator/backward", "generator/optimizer", "generator/ema")


def matmul_flops_per_second(size: int = 1024, seconds: float = 1.0) -> float:
    """This device's fp32 matmul throughput at the current thread count (the FLOP floor's denominator)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - started)


def _profile_training(config_path: str, steps: int) -> dict:
    """Milliseconds per update of each labelled part, per phase, and the update's FLOPs."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from pdmd.training.config import TrainConfig
    from pdmd.training.trainer import Trainer

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(TrainConfig.from_yaml(config_path, output_dir=folder))
        config = trainer.config
        phases = []
        for phase, start in enumerate(sum(config.updates_per_phase[:k]) for k in range(len(config.updates_per_phase))):
            trainer.step = start + config.warm_start_updates(phase)  # a DMD update, past any regression warm start
            trainer.train_step()  # warm-up
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            plain = (time.perf_counter() - started) / steps
            with profile(activities=activities) as profiler:
                for _ in range(steps):
                    trainer.train_step()
            totals = {event.key: event.cpu_time_total / 1000 / steps for event in profiler.key_averages()
                      if event.key in LABELS}
            with FlopCounterMode(display=False) as flops:
                trainer.train_step()
            phases.append({"phase": phase + 1, "seconds_per_update": plain,
                           "parts_ms": {label: totals.get(label, 0.0) for label in LABELS},
                           "flops_per_update": flops.get_total_flops()})
        started = time.perf_counter()
        trainer.save_checkpoint()
        checkpoint = time.perf_counter() - started
        started = time.perf_counter()
        trainer.save_samples()
        samples = time.perf_counter() - started
    return {"phases": phases, "updates_per_phase": list(config.updates_per_phase),
            "checkpoint_ms_per_update": 1000 * checkpoint / config.checkpoint_every,
            "samples_ms_per_update": 1000 * samples / config.sample_every,
            "matmul_flops_per_second": matmul_flops_per_second()}


def print_profile(result: dict) -> None:
    """The profile as a markdown table: one column per phase, then the run's time-weighted whole."""
    phases, rate = result["phases"], result["matmul_flops_per_second"]
    io = {"checkpoint I/O (amortised)": result["checkpoint_ms_per_update"],
          "sample grid (amortised)": result["samples_ms_per_update"]}
    head = [f"phase {p['phase']} (ms/update)" for p in phases]
    print("| part | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    for label in LABELS:
        print(f"| {label} | " + " | ".join(f"{p['parts_ms'][label]:.1f}" for p in phases) + " |")
    print("| other (batch draw, clipping, logging, profiler) | " + " | ".join(
        f"{1000 * p['seconds_per_update'] - sum(p['parts_ms'].values()):.1f}" for p in phases) + " |")
    for name, ms in io.items():
        print(f"| {name} | " + " | ".join(f"{ms:.1f}" for _ in phases) + " |")
    print("| **update, wall (unprofiled)** | " + " | ".join(f"**{1000 * p['seconds_per_update']:.0f}**" for p in phases) + " |")
    print("| GFLOP per update | " + " | ".join(f"{p['flops_per_update'] / 1e9:.2f}" for p in phases) + " |")
    print(f"| floor at {rate / 1e9:.0f} GFLOP/s matmul | " + " | ".join(
        f"{1000 * p['flops_per_update'] / rate:.0f}" for p in phases) + " |")
    total = sum(n * p["seconds_per_update"] for n, p in zip(result["updates_per_phase"], phases))
    floor = sum(n * p["flops_per_update"] / rate for n, p in zip(result["updates_per_phase"], phases))
    print(f"\nwhole run: {total / 60:.1f} min of updates, FLOP floor {floor / 60:.1f} min "
          f"({total / floor:.1f}x the floor)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=positive_int, default=5, help="timed generator steps (after one warm-up)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads in both measurements")
    parser.add_argument("--profile", action="store_true",
                        help="break one update into its parts and set its FLOPs against the matmul throughput")
    parser.add_argument("--json", action="store_true", help="with --profile: print JSON instead of a table")
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
    needed = 2 * args.steps + 2 if args.profile else args.steps + 1  # warm-up (+ profiled steps and one counted)
    if needed > shortest:  # the timed steps would run on into the next phase
        print(f"bench-train: --steps {args.steps} needs {needed} updates in a phase, more than the shortest phase "
              f"of {args.config} ({shortest})", file=sys.stderr)
        return 2
    if args.profile:
        result = _profile_training(args.config, args.steps)
        result.update(device="cuda" if torch.cuda.is_available() else "cpu", threads=torch.get_num_threads())
        print(json.dumps(result)) if args.json else print_profile(result)
        return 0

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
