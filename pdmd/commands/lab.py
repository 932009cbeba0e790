"""``python -m pdmd lab``: the 2-D Gaussian-mixture study, every method on one code path, with diversity metrics."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from pdmd.commands.arguments import positive_int, seed
from pdmd.lab import METHOD_CHOICES, LabConfig, Mixture, plot, run_lab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="all", choices=(*METHOD_CHOICES, "all"),
                        help="distillation method, 'teacher' for the reference sampler, or 'all'")
    parser.add_argument("--modes", type=positive_int, default=8, help="modes on the ring")
    parser.add_argument("--grid", action="store_true", help="use a 5x5 grid of modes instead of a ring")
    parser.add_argument("--teacher", choices=("exact", "mlp"), default="exact",
                        help="real score: closed-form mixture velocity or the flow-matching MLP")
    parser.add_argument("--iters", type=positive_int, default=LabConfig.iters, help="generator updates")
    parser.add_argument("--batch", type=positive_int, default=LabConfig.batch)
    parser.add_argument("--fake-ratio", type=positive_int, default=LabConfig.fake_ratio)
    parser.add_argument("--teacher-iters", type=positive_int, default=LabConfig.teacher_iters)
    parser.add_argument("--gradient", choices=("x0", "velocity"), default=LabConfig.gradient)
    parser.add_argument("--samples", type=positive_int, default=LabConfig.eval_samples,
                        help="samples drawn per method for the metrics")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 avoids contention with other jobs)")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw data, teacher and every method side by side")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    mixture = Mixture.grid() if args.grid else Mixture.ring(args.modes)
    config = LabConfig(iters=args.iters, batch=args.batch, fake_ratio=args.fake_ratio,
                       teacher_iters=args.teacher_iters, gradient=args.gradient, eval_samples=args.samples)
    methods = list(METHOD_CHOICES) if args.method == "all" else [args.method]
    if args.plot and "teacher" not in methods:
        methods.insert(0, "teacher")
    results, samples = run_lab(methods, mixture, args.teacher, args.seed, config)
    if args.plot:
        plot(samples, results, args.plot)
    if args.method != "all":
        results = [row for row in results if row["method"] == args.method]
    if args.json:
        print(json.dumps(results if args.method == "all" else results[0]))
    else:
        columns = ("method", "nfe", "modes_covered", "modes_total", "mode_kl", "spread_ratio", "sliced_w", "seconds")
        print("  ".join(f"{c:>13}" for c in columns))
        for row in results:
            print("  ".join(f"{row[c]!s:>13}" for c in columns))
    sys.stdout.flush()
    return 0
