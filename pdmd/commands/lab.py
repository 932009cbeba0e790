"""``python -m pdmd lab``: the 2-D Gaussian-mixture study, every method on one code path, with diversity metrics."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from pdmd.commands.arguments import non_negative_float, positive_float, positive_int, seed, seed_list, whole_number
from pdmd.lab import (
    METHOD_CHOICES,
    ROW_COLUMNS,
    LabConfig,
    Mixture,
    markdown_table,
    plot,
    run_lab_seeds,
    summarize,
    summary_table,
)


def adam_beta(text: str) -> float:
    """argparse type: an Adam beta in [0, 1)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} must be below 1")
    return value


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
    parser.add_argument("--lr-generator", type=positive_float, default=LabConfig.lr_generator)
    parser.add_argument("--beta1", type=adam_beta, default=LabConfig.beta1_generator,
                        help="the generator's Adam beta1 (adversarial-style trainers often use 0)")
    parser.add_argument("--lr-fake", type=positive_float, default=LabConfig.lr_fake)
    parser.add_argument("--renoise-shift", type=positive_float, default=LabConfig.renoise_shift,
                        help="shift of the re-noising time t ~ T(s, 1); above 1 favours high noise")
    parser.add_argument("--hidden", type=whole_number(2, 4096), default=LabConfig.hidden,
                        help="width of every MLP (base, students, fake scores)")
    parser.add_argument("--space-frequencies", type=whole_number(0, 16), default=LabConfig.space_frequencies,
                        help="sinusoidal x features per coordinate (0: raw x, y)")
    parser.add_argument("--teacher-iters", type=positive_int, default=LabConfig.teacher_iters,
                        help="flow-matching iterations of the MLP base (the students' and fake scores' init)")
    parser.add_argument("--gradient", choices=("x0", "velocity"), default=LabConfig.gradient)
    parser.add_argument("--samples", type=positive_int, default=LabConfig.eval_samples,
                        help="samples drawn per method for the metrics")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 avoids contention with other jobs)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=seed, default=0)
    seeds.add_argument("--seeds", type=seed_list, metavar="0-4|0,1,2",
                       help="run every seed and report mean ± std (sample std over seeds) of every metric")
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of a table (with --seeds: per-seed rows and the summary)")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw data, teacher and every method side by side (the first seed)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    mixture = Mixture.grid() if args.grid else Mixture.ring(args.modes)
    config = LabConfig(iters=args.iters, batch=args.batch, fake_ratio=args.fake_ratio,
                       lr_generator=args.lr_generator, beta1_generator=args.beta1, lr_fake=args.lr_fake,
                       renoise_shift=args.renoise_shift, hidden=args.hidden,
                       space_frequencies=args.space_frequencies, teacher_iters=args.teacher_iters,
                       gradient=args.gradient, eval_samples=args.samples)
    seeds = args.seeds or [args.seed]
    methods = list(METHOD_CHOICES) if args.method == "all" else [args.method]
    if args.plot and "teacher" not in methods:
        methods.insert(0, "teacher")
    runs, samples = run_lab_seeds(methods, mixture, args.teacher, seeds, config)
    if args.plot:
        plot(samples, runs[0], args.plot)
    if args.method != "all":
        runs = [[row for row in rows if row["method"] == args.method] for rows in runs]
    if args.seeds is None:
        print_one_seed(runs[0], args.json, single=args.method != "all")
    elif args.json:
        print(json.dumps({"seeds": seeds, "runs": runs, "summary": summarize(runs)}))
    else:
        print(f"mean ± std over seeds {', '.join(map(str, seeds))}\n")
        print(markdown_table(*summary_table(summarize(runs))))
    sys.stdout.flush()
    return 0


def print_one_seed(rows: list[dict], as_json: bool, single: bool) -> None:
    if as_json:
        print(json.dumps(rows[0] if single else rows))
        return
    print("  ".join(f"{c:>13}" for c in ROW_COLUMNS))
    for row in rows:
        print("  ".join(f"{row[c]!s:>13}" for c in ROW_COLUMNS))
