"""Levers for the time to a usable student: a preset with one change each, trained one after another.

    python benchmarks/train_levers.py --out runs/levers base cfg7 regression-25                 # one seed each
    python benchmarks/train_levers.py --out runs/seeds phased-200 dmd-sgts-200 --seeds 0 1 2    # training seeds
    python benchmarks/train_levers.py --preset configs/default.yaml --out runs/default phase2-600
    python benchmarks/time_to_student.py runs/levers/* --per-prompt 16 --plot levers.png

The base is ``configs/levers-base.yaml`` (the quick recipe at 50 + 300 updates, no warm start) unless ``--preset``.

Every run probes 12 prompts x ``--per-prompt`` images every 50 updates (probe.jsonl: adherence and FD against
training seconds), trains with one torch thread (two runs share the 2 cores), and resumes from its latest
checkpoint when started again, so a cut session loses at most 50 updates.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

# one change each against the preset; every method keeps the same recipe (one code path, equal budgets)
LEVERS: dict[str, dict] = {
    "base": {},
    "constant-lr": {"lr_decay": "constant"},
    "cfg6": {"teacher_cfg": 6.0},
    "cfg7": {"teacher_cfg": 7.0},
    "lr-fake-2e-3": {"lr_fake": 2.0e-3},
    "lr-generator-2e-3": {"lr_generator": 2.0e-3},
    "renoise-shift-3": {"renoise_shift": 3.0},
    "phase1-100": {"updates_per_phase": [100, 300]},
    "fake-ratio-4": {"fake_ratio": 4},
    "batch-8": {"batch_size": 8},
    "no-checkpointing": {"gradient_checkpointing": False},  # the same numbers: more memory, less recomputing
    # a warm start: each phase's first 25 updates regress on 64 teacher trajectories (12 Euler steps, CFG 5)
    "regression-25": {"regression_updates": 25, "regression_pairs": 64},
    # the same recipe for the other 4-step method: one phase over the same 4 Euler steps, the same 350 updates
    "dmd-sgts": {"method": "dmd-sgts", "schedule": {"steps": 4}, "updates_per_phase": [350]},
    # the phased vs dmd-sgts comparison over training seeds (issue 17), at 200 updates each
    "phased-200": {"updates_per_phase": [50, 150]},
    "dmd-sgts-200": {"method": "dmd-sgts", "schedule": {"steps": 4}, "updates_per_phase": [200]},
    # with --preset configs/default.yaml: the default recipe as it was measured, 100 + 600 updates
    "phase2-600": {"updates_per_phase": [100, 600]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("levers", nargs="+", choices=sorted(LEVERS))
    parser.add_argument("--preset", type=Path, default=Path("configs/levers-base.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/levers"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the probe set stays fixed)")
    parser.add_argument("--per-prompt", type=int, default=16, help="probe images per prompt (16: 192 images)")
    args = parser.parse_args()

    preset = yaml.safe_load(args.preset.read_text())
    for seed in args.seeds:
        for name in args.levers:
            folder = args.out / (name if args.seeds == [0] else f"{name}-seed{seed}")
            config = {**preset, **LEVERS[name], "seed": seed, "output_dir": str(folder), "probe_every": 50,
                      "probe_per_prompt": args.per_prompt}
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "lever.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            print(f"== {folder}", flush=True)
            subprocess.run([sys.executable, "-m", "pdmd", "train", "--config", str(path), "--resume", "latest",
                            "--threads", "1", "--no-progress"], check=True)


if __name__ == "__main__":
    main()
