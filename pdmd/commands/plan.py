"""``python -m pdmd plan --config FILE | --teacher ID_OR_PATH [--gpu-memory GiB] [--json]``: the memory of a
distillation run per component, built from the teacher's config files on the meta device (no weight is read,
nothing is downloaded for the shipped public checkpoints), whether it fits, and the cheapest changes that make it.

With ``--teacher`` and no config, what is not given is assumed and said: batch 1 (TrainConfig's default batch of 8
is the built-in teacher's), the pipeline's own size, and a CUDA run in bf16 when ``--gpu-memory`` names a GPU
budget."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from pdmd.commands.arguments import positive_float, positive_int

GIB = 2**30
REAL_TEACHER_BATCH = 1  # a plan from a teacher alone starts here; the fixes it suggests need not shrink the batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdmd.teachers.quantize import QUANTIZATIONS
    parser.add_argument("--config", help="training config (YAML); the options below override it")
    parser.add_argument("--teacher", help="pipeline folder or Hub id (shipped: see assets/architectures)")
    parser.add_argument("--gpu-memory", type=positive_float, metavar="GiB",
                        help="memory budget per GPU (default: the visible GPU's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--quantize", choices=QUANTIZATIONS)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--height", type=positive_int)
    parser.add_argument("--width", type=positive_int)
    parser.add_argument("--num-frames", type=positive_int)
    parser.add_argument("--gradient-checkpointing", choices=("true", "false", "rollout"))
    parser.add_argument("--offload", action="store_true", help="text encoders and VAE kept on the CPU")
    parser.add_argument("--processes", type=positive_int, default=1, help="FSDP2: shard the base over N GPUs")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"))
    parser.add_argument("--device", choices=("cuda", "cpu"), help="plan for this device (default: cuda when "
                        "visible, else cpu; a CPU run keeps the text encoders in memory)")
    parser.add_argument("--full-trace", action="store_true", help="build and trace every block of the networks "
                        "(minutes) instead of one block per kind extrapolated to the full depth (seconds; see "
                        "pdmd/plan/stacks.py)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")


def settings_from_args(args: argparse.Namespace) -> tuple[object, list[str]]:
    """(PlanSettings, what was assumed because neither the command line nor a config gave it)."""
    from pdmd.plan.memory import PlanSettings
    from pdmd.training.config import TrainConfig

    overrides = {"teacher": args.teacher, "dtype": args.dtype, "batch_size": args.batch_size,
                 "height": args.height, "width": args.width, "num_frames": args.num_frames}
    assumed = []
    if args.config:
        config = TrainConfig.from_yaml(args.config, **overrides)
    elif args.teacher:
        given = {k: v for k, v in overrides.items() if v is not None}
        if "batch_size" not in given:
            given["batch_size"] = REAL_TEACHER_BATCH
            assumed.append(f"batch_size {REAL_TEACHER_BATCH}")
        config = TrainConfig.from_dict(given)
    else:
        raise ValueError("give --config FILE or --teacher ID_OR_PATH")
    if config.teacher == "builtin":
        raise ValueError("plan is for diffusers teachers; the built-in teacher trains in ~100 MB")
    extra = {"processes": args.processes}
    if args.gradient_checkpointing:
        extra["gradient_checkpointing"] = {"true": True, "false": False, "rollout": "rollout"}[
            args.gradient_checkpointing]
    for name in ("quantize", "optimizer", "device"):
        if getattr(args, name):
            extra[name] = getattr(args, name)
    if args.offload:
        extra["offload"] = True
    if not args.device and args.gpu_memory:  # a GPU budget plans a GPU run, whatever this machine has
        extra["device"] = "cuda"
        assumed.append("device cuda (--gpu-memory)")
    settings = PlanSettings.from_config(config, **extra)
    if not args.config and not args.dtype:
        assumed.append(f"dtype {settings.dtype} (the {settings.device} default)")
    return settings, assumed


def run(args: argparse.Namespace) -> int:
    from pdmd.plan.architectures import PlanError
    from pdmd.plan.planner import format_table, plan, visible_gpu_bytes
    from pdmd.teachers.base import TeacherError
    from pdmd.training.config import ConfigError

    torch.set_num_threads(args.threads)
    try:
        settings, assumed = settings_from_args(args)
        budget = round(args.gpu_memory * GIB) if args.gpu_memory else visible_gpu_bytes()
        result = plan(settings, budget, fast=not args.full_trace)
    except (PlanError, ConfigError, TeacherError, ValueError) as err:
        print(f"python -m pdmd plan: error: {err}", file=sys.stderr)
        return 2
    defaults = [name for name in ("height", "width", "num_frames") if getattr(settings, name) is None and result[name]]
    if not args.config and defaults:
        assumed.append(", ".join(f"{name} {result[name]}" for name in defaults) + " (the pipeline's defaults)")
    result["assumed"] = assumed
    print(json.dumps(result) if args.json else format_table(result))
    return 0
