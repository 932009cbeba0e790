"""``python -m pdmd train --config FILE``: LoRA phased distillation, one device or many (``accelerate launch``)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

from pdmd.commands.arguments import positive_float, positive_int
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.trainer import Trainer, TrainingDiverged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see assets/students/*/config.yaml)")
    parser.add_argument("--resume", metavar="latest|DIR", help="resume from the latest checkpoint or a folder")
    parser.add_argument("--max-steps", type=positive_int,
                        help="stop (with a checkpoint) after this many generator steps")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--from-student", metavar="DIR",
                        help="keep this finished student's experts before --start-phase and train from there")
    parser.add_argument("--start-phase", type=positive_int, metavar="K",
                        help="with --from-student: the first phase to train (2 or more)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--gpu-memory", type=positive_float, metavar="GiB",
                        help="refuse the run unless its planned peak fits this budget (default: the visible GPU's)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if bool(args.from_student) != bool(args.start_phase):
            raise ConfigError("--from-student and --start-phase go together")
        config = TrainConfig.from_yaml(args.config, output_dir=args.output_dir)
        from pdmd.plan.planner import refuse_if_too_big  # before anything is loaded (and only when asked: lazy)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        refuse_if_too_big(config, args.gpu_memory, processes=world if config.fsdp else 1)
        trainer = Trainer(config)
        if args.resume and trainer.resume(args.resume, say=lambda line: print(line, file=sys.stderr)) is None:
            print(f"no checkpoint in {trainer.run.checkpoints} yet: starting a new run", file=sys.stderr)
        if args.from_student and trainer.step == 0:  # a resumed run has already taken them
            trainer.start_from_student(args.from_student, args.start_phase)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # StudentError, CheckpointError too
        print(f"python -m pdmd train: error: {err}", file=sys.stderr)
        return 2

    def stop_gracefully(signum, frame):  # SIGTERM (the job manager's stop, `kill PID`): checkpoint, then exit
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, stop_gracefully)
    try:
        result = trainer.fit(args.max_steps, progress=not args.no_progress)
    except TrainingDiverged as err:  # the user's to fix (a learning rate), not a bug: no traceback
        if trainer.is_main:
            trainer.run.write_status("failed", trainer.step, str(err))
        print(f"python -m pdmd train: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a crash: say so in status.json, keep the traceback and a nonzero exit
        if trainer.is_main:
            trainer.run.write_status("failed", trainer.step, f"{type(err).__name__}: {err}")
        raise
    if trainer.is_main:
        print(json.dumps(result))
    return 0
