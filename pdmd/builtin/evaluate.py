"""``python -m pdmd eval``: generate images for a fixed prompt set and measure them with pdmd.builtin.metrics.

``evaluate`` works on any Teacher; pass ``experts`` (one velocity callable per phase of ``schedule``) to
evaluate a student instead of the teacher's own sampler. ``boundary_fidelity`` measures a phased student at each
of its boundaries; ``mean_and_std`` summarises rows over eval seeds.
"""
from __future__ import annotations

import itertools
import statistics
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pdmd.builtin import metrics, scenes
from pdmd.core.sampling import Velocity
from pdmd.core.schedule import PhaseSchedule
from pdmd.teachers.base import Teacher

if TYPE_CHECKING:
    from pdmd.students.folder import Student

# Dataset images per prompt in the FD reference: more than we generate, so the reference is the better estimate.
REFERENCE_PER_PROMPT = 32
REFERENCE_SEED = 5_555_555


def eval_prompts(count: int) -> list[str]:
    """The first ``count`` prompts of a fixed order of all full prompts. The order is greedy -- each next
    prompt is the one whose attributes, then attribute pairs, have been used least -- so any prefix covers
    colours, shapes and backgrounds, and their combinations, as evenly as possible."""
    remaining = list(itertools.product(range(len(scenes.COLOURS)), range(len(scenes.SHAPES)),
                                       range(len(scenes.BACKGROUNDS))))
    used: dict[tuple, int] = {}

    def parts(combo):
        singles = [(k, v) for k, v in enumerate(combo)]
        return singles, list(itertools.combinations(singles, 2))

    def cost(combo):
        singles, pairs = parts(combo)
        return (sorted((used.get(p, 0) for p in singles), reverse=True), sum(used.get(p, 0) for p in pairs))

    chosen = []
    while remaining and len(chosen) < count:
        best = min(remaining, key=cost)
        remaining.remove(best)
        for part in sum(parts(best), []):
            used[part] = used.get(part, 0) + 1
        chosen.append(scenes.prompt_for(*best))
    return chosen


def measure(images_per_prompt: list[Tensor], prompts: list[str], probe: metrics.Probe,
            reference_seed: int = REFERENCE_SEED) -> dict:
    """The domain metrics of a set of images grouped by prompt (images in [0, 1])."""
    attributes = [scenes.parse_prompt(p).attributes for p in prompts]
    images = torch.cat(images_per_prompt)
    targets = [a for a, group in zip(attributes, images_per_prompt) for _ in range(group.shape[0])]
    predicted = metrics.probe_outputs(probe, images)
    features = predicted["features"].split([g.shape[0] for g in images_per_prompt])
    reference = torch.cat([scenes.render(scenes.labels_for_prompt(a, REFERENCE_PER_PROMPT, reference_seed + i))
                           for i, a in enumerate(attributes)])
    position, size = metrics.spatial_spread(images_per_prompt)
    return {
        "adherence": metrics.adherence(predicted, targets),
        "diversity": metrics.feature_diversity(list(features)),
        "fd": metrics.frechet_distance(predicted["features"], metrics.probe_outputs(probe, reference)["features"]),
        "position_spread": position,
        "size_spread": size,
    }


def generate(teacher: Teacher, prompts: list[str], per_prompt: int, seed: int, schedule: PhaseSchedule,
             cfg: float, experts: Velocity | list[Velocity] | None = None) -> tuple[list[Tensor], int, float]:
    """Images per prompt, NFE per image, and the wall time of sampling and decoding (nothing else)."""
    groups, nfe, seconds = [], 0, 0.0
    for index, prompt in enumerate(prompts):
        began = time.perf_counter()
        result = teacher.sample([prompt] * per_prompt, seed=seed * 100_003 + index, schedule=schedule, cfg=cfg,
                                experts=experts)
        images = teacher.decode(result.sample).cpu()
        seconds += time.perf_counter() - began
        groups.append(images)
        nfe = result.nfe
    return groups, nfe, seconds


def evaluate(teacher: Teacher, schedule: PhaseSchedule | None = None, cfg: float | None = None, seed: int = 0,
             prompts: list[str] | None = None, per_prompt: int = 8,
             experts: Velocity | list[Velocity] | None = None, probe: metrics.Probe | None = None) -> dict:
    """Generate ``per_prompt`` images for each prompt and measure them (defaults: the teacher's own sampler,
    the 12 standard eval prompts)."""
    schedule = schedule or PhaseSchedule.uniform(teacher.default_steps, teacher.default_shift)
    cfg = teacher.default_cfg if cfg is None else cfg
    prompts = prompts or eval_prompts(12)
    probe = probe or metrics.load_probe()
    groups, nfe, seconds = generate(teacher, prompts, per_prompt, seed, schedule, cfg, experts)
    return {**measure(groups, prompts, probe), "nfe": nfe, "seconds": seconds,
            "images": sum(g.shape[0] for g in groups)}


def boundary_fidelity(student: Student, seed: int = 0, prompts: list[str] | None = None, per_prompt: int = 8,
                      teacher_steps: int | None = None, probe: metrics.Probe | None = None) -> dict[float, float]:
    """How close a phased student's x_{t_k} is to the teacher's marginal p_{t_k} (docs/method.md §2, after Eq.
    (11): expert k should land on p_{t_k}), for every interior boundary t_k: the FD of probe features of images
    the *teacher* finishes from the student's own x_{t_k} (phases k+1..K handed back, Student.with_teacher_phases)
    against the dataset reference. If x_{t_k} were a teacher sample, this would be the teacher's own FD. Returns
    {t_k: FD}; empty for a one-phase student."""
    probe = probe or metrics.load_probe()
    phases = student.schedule.num_phases
    result = {}
    for k, t in enumerate(student.schedule.boundaries):
        schedule, experts, cfg = student.with_teacher_phases(range(k + 1, phases), teacher_steps=teacher_steps)
        with student.roles.active(None):
            row = evaluate(student.roles.teacher, schedule, cfg, seed, prompts, per_prompt, experts, probe)
        result[t] = row["fd"]
    return result


def mean_and_std(rows: list[dict], keys) -> dict[str, tuple[float, float]]:
    """{key: (mean, sample standard deviation)} of ``rows[i][key]`` over rows (e.g. one row per eval seed); the
    deviation is 0.0 for a single row."""
    summary = {}
    for key in keys:
        values = [float(row[key]) for row in rows]
        summary[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return summary
