"""Time to a usable student: adherence and FD against training seconds, from the probe.jsonl runs write.

    python -m pdmd train --config configs/default.yaml --threads 1 --no-progress          # probe_every is on
    python benchmarks/time_to_student.py runs/default runs/default-dmd-sgts --plot docs/time-to-student.png

Each run folder's probe rows (its student measured on the fixed probe set while it trained: 12 eval prompts,
seed 0) are drawn against the training seconds so far, next to the teacher on the same probe set. The table
gives, per run, the first measured time at which the student was within the targets (adherence >= 0.95x the
teacher's, FD <= 1.5x), and its last row.

Runs of one recipe on several training seeds (folders ``<recipe>-seed<k>``, as train_levers.py names them) are
also summarised as mean ± std over the seeds, at equal updates (``--at-step``, default: the last step every
run reached) and at equal training time (``--at-minutes``, default: the shortest run's training time; each run's
last probe row at or before it, so the resolution is the probe interval). Runs that shared a busy machine
measured inflated, uneven seconds: ``--idle RECIPE=FILE`` puts each row of that recipe at the time its updates
take on an idle machine instead, from ``bench-train --json`` seconds per update of each phase:

    python benchmarks/train_levers.py --out runs/seeds phased-200 dmd-sgts-200 --seeds 0 1 2
    python -m pdmd bench-train --config runs/seeds/phased-200-seed0/lever.yaml --threads 1 > phased.json
    python benchmarks/time_to_student.py runs/seeds/* --per-prompt 16 --idle phased-200=phased.json ...
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from pdmd import lab
from pdmd.builtin.evaluate import eval_prompts, evaluate
from pdmd.teachers import load_teacher
from pdmd.training.run_folder import RunFolder

ADHERENCE_RATIO, FD_RATIO = 0.95, 1.5  # the quick preset's targets (issue 16), relative to the teacher


def label_of(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
        return f"{folder.name} ({config['method']})"
    except (OSError, ValueError, KeyError):
        return folder.name


def first_within(rows: list[dict], teacher: dict) -> float | None:
    for row in rows:
        if row["adherence"] >= ADHERENCE_RATIO * teacher["adherence"] and row["fd"] <= FD_RATIO * teacher["fd"]:
            return row["seconds"]
    return None


METRICS = ("adherence", "fd", "diversity", "position_spread")


def by_recipe(curves: dict[Path, list[dict]]) -> dict[str, list[list[dict]]]:
    """Seed runs grouped by recipe: ``name-seed3`` goes with ``name-seed0``; a folder without the suffix stays alone."""
    groups: dict[str, list[list[dict]]] = {}
    for folder, rows in curves.items():
        groups.setdefault(recipe_of(folder), []).append(rows)
    return groups


def recipe_of(folder: Path) -> str:
    """A run folder's recipe: its name without train_levers' ``-seed<k>``."""
    return re.sub(r"-seed\d+$", "", folder.name)


def idle_seconds(step: int, updates_per_phase: list[int], costs: list[float]) -> float:
    """Seconds the first ``step`` updates take at a per-update cost for each phase."""
    seconds, start = 0.0, 0
    for updates, cost in zip(updates_per_phase, costs):
        seconds += min(max(step - start, 0), updates) * cost
        start += updates
    return seconds


def mean_std(values: list[float], digits: int) -> str:
    return lab.cell_text(**lab.mean_std(values), digits=digits)


def seeds_table(groups: dict[str, list[list[dict]]], title: str, pick) -> None:
    """One row per recipe: each run's row that ``pick(rows)`` chooses, as mean ± std over the runs."""
    print(f"\n{title}\n\n| recipe | seeds | updates | training minutes | " + " | ".join(METRICS) + " |")
    print("|---|---|---|---|" + "---|" * len(METRICS))
    for name, runs in groups.items():
        picked = [row for row in map(pick, runs) if row is not None]
        if not picked:
            continue
        cells = [mean_std([row["step"] for row in picked], 0), mean_std([row["seconds"] / 60 for row in picked], 1),
                 *(mean_std([row[key] for row in picked], 3 if key == "adherence" else 2) for key in METRICS)]
        print(f"| {name} | {len(picked)} | " + " | ".join(cells) + " |")


def plot(curves: dict[str, list[dict]], teacher: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, name in ((axes[0], "adherence", "adherence"), (axes[1], "fd", "FD (lower is better)")):
        for label, rows in curves.items():
            ax.plot([r["seconds"] / 60 for r in rows], [r[key] for r in rows], marker="o", markersize=3, label=label)
        ax.axhline(teacher[key], color="black", linestyle="--", linewidth=1, label="teacher (64 NFE)")
        bound = ADHERENCE_RATIO * teacher[key] if key == "adherence" else FD_RATIO * teacher[key]
        ax.axhline(bound, color="grey", linestyle=":", linewidth=1, label=f"target ({'0.95' if key == 'adherence' else '1.5'}x)")
        ax.set_xlabel("training minutes (updates only)")
        ax.set_title(name, fontsize=10)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with a probe.jsonl")
    parser.add_argument("--plot", type=Path, help="write the curves as a PNG")
    parser.add_argument("--per-prompt", type=int, default=8, help="the runs' probe_per_prompt (the teacher's too)")
    parser.add_argument("--at-step", type=int, help="seed table at this many updates (a probed step)")
    parser.add_argument("--at-minutes", type=float, help="seed table at this much training time")
    parser.add_argument("--idle", action="append", default=[], metavar="RECIPE=FILE",
                        help="time a recipe's rows by its bench-train --json costs (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    idle = {name: json.loads(Path(file).read_text()) for name, file in (item.split("=", 1) for item in args.idle)}
    torch.set_num_threads(args.threads)

    teacher_eval = evaluate(load_teacher("builtin"), seed=0, prompts=eval_prompts(12), per_prompt=args.per_prompt)
    teacher = {k: teacher_eval[k] for k in ("adherence", "fd", "diversity", "position_spread")}
    probes = {folder: RunFolder(folder).probes() for folder in args.runs}
    for folder, rows in probes.items():
        bench = idle.get(recipe_of(folder))
        updates = json.loads((folder / "config.json").read_text())["updates_per_phase"] if bench else []
        for row in rows if bench else []:
            row["seconds"] = idle_seconds(row["step"], updates, bench["seconds_per_generator_step"])
    curves = {label_of(folder): rows for folder, rows in probes.items()}
    print(f"teacher on the probe set: adherence {teacher['adherence']:.3f}, FD {teacher['fd']:.2f}, "
          f"diversity {teacher['diversity']:.2f}, position std {teacher['position_spread']:.2f}\n")
    print("| run | first within targets | last row: minutes | updates | adherence | FD | diversity | position std |")
    print("|---|---|---|---|---|---|---|---|")
    for label, rows in curves.items():
        if not rows:
            print(f"| {label} | no probe rows | | | | | | |")
            continue
        reached, last = first_within(rows, teacher), rows[-1]
        print(f"| {label} | {'not reached' if reached is None else f'{reached / 60:.1f} min'} | "
              f"{last['seconds'] / 60:.1f} | {last['step']} | {last['adherence']:.3f} | {last['fd']:.2f} | "
              f"{last['diversity']:.2f} | {last['position_spread']:.2f} |")
    groups = {name: runs for name, runs in by_recipe({f: r for f, r in probes.items() if r}).items() if len(runs) > 1}
    if groups:
        step = args.at_step or min(rows[-1]["step"] for runs in groups.values() for rows in runs)
        seeds_table(groups, f"Over training seeds, at {step} updates:",
                    lambda rows: next((row for row in rows if row["step"] == step), None))
        minutes = args.at_minutes or min(rows[-1]["seconds"] for runs in groups.values() for rows in runs) / 60
        seeds_table(groups, f"Over training seeds, at {minutes:.1f} training minutes:",
                    lambda rows: next((row for row in reversed(rows) if row["seconds"] <= minutes * 60), None))
    if args.plot:
        plot(curves, teacher, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
