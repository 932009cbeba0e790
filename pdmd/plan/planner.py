"""The plan: the component table, the peaks, whether they fit a memory budget, and the cheapest changes that
make a run fit (tried in order of what they cost the run: speed first, then quality, then hardware)."""
from __future__ import annotations

from dataclasses import replace

import torch

from pdmd.plan.memory import PlanSettings, components, fit_peak, peaks
from pdmd.teachers.quantize import bitsandbytes_available

GIB = 2**30
# FSDP over a quantized base is refused by TrainConfig (torchao's tensors do not split under fully_shard), so the
# planner never suggests the two together; set True once that combination trains
FSDP_WITH_QUANTIZED_BASE = False
NF4_NOT_INSTALLED = "quantize: nf4 not considered: pip install bitsandbytes (and a CUDA GPU) to let plan try it"


def visible_gpu_bytes() -> int | None:
    """Total memory of the visible GPU, None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def _candidates(settings: PlanSettings, facts: dict):
    """(description, settings) steps, cheapest first; each builds on the previous ones."""
    if settings.gradient_checkpointing is not True:
        yield "gradient_checkpointing: true", dict(gradient_checkpointing=True)
    if not settings.offload:
        yield "offload: true", dict(offload=True)
    if settings.batch_size > 1:
        yield "batch_size: 1", dict(batch_size=1)
    if settings.quantize == "none":
        yield "quantize: int8", dict(quantize="int8")
    if settings.quantize in ("none", "int8", "fp8") and settings.device == "cuda":
        if bitsandbytes_available():
            yield "quantize: nf4", dict(quantize="nf4")
        else:
            yield NF4_NOT_INSTALLED, {}
    frames = facts.get("num_frames")
    if frames and frames > 17:
        yield "num_frames: 17", dict(num_frames=17)
    height, width = facts["height"], facts["width"]
    for scale in (0.75, 0.5):  # rounded to 16 pixels, the largest multiple any family needs
        size = dict(height=max(16, int(height * scale) // 16 * 16), width=max(16, int(width * scale) // 16 * 16))
        yield f"height: {size['height']}, width: {size['width']}", size


def _fsdp_candidates(settings: PlanSettings):
    if settings.quantize != "none" and not FSDP_WITH_QUANTIZED_BASE:
        return
    for n in (2, 4, 8):
        if n > settings.processes:
            yield f"fsdp over {n} GPUs", dict(processes=n)


def plan(settings: PlanSettings, budget: int | None = None, suggest: bool = True, fast: bool = True) -> dict:
    """One object: ``components``, ``peak_bytes`` (training), ``inference_peak_bytes``, ``budget_bytes``, ``fits``
    (None without a budget), ``suggestions`` (the changes, applied together, that make it fit) and ``notes`` (options
    the search could not try). ``fast``: the networks cut to one block per kind, traced at full depth with blocks
    replaying their kind's memory (pdmd.plan.stacks); False: built and traced whole (minutes: the reference the
    fast plan is tested against)."""
    rows, facts = components(settings, fast)
    result_peaks = peaks(rows)
    fits = None if budget is None else result_peaks["peak"] <= budget
    suggestions: list[str] = []
    notes: list[str] = []
    if fits is False and suggest:
        suggestions, notes = _cheapest_fix(settings, facts, budget, fast)
    return {"teacher": settings.teacher, "settings": _describe(settings), **facts,
            "components": [{"name": r.name, "bytes": r.bytes, "gib": round(r.bytes / GIB, 3), "counts_in": r.when,
                            "note": r.note} for r in rows],
            "peak_bytes": result_peaks["peak"], "training_peak_bytes": result_peaks["training"],
            "inference_peak_bytes": result_peaks["inference"], "budget_bytes": budget, "fits": fits,
            "suggestions": suggestions, "notes": notes}


def _cheapest_fix(settings: PlanSettings, facts: dict, budget: int, fast: bool) -> tuple[list[str], list[str]]:
    """(changes, notes): single-device changes first (accumulated), then FSDP on top of checkpointing and offload;
    notes name the options that could not be tried here."""
    steps = list(_candidates(settings, facts))
    notes = [description for description, change in steps if not change]  # options that cannot be tried here
    changes = [(description, change) for description, change in steps if change]
    everything = settings
    for _, change in changes:
        everything = replace(everything, **change)
    applied, current = [], settings
    for index, (description, change) in enumerate(changes):
        current = replace(current, **change)
        applied.append(description)
        if fit_peak(current, fast) <= budget:
            return applied, notes
        # each change lowers the peak (checkpointing comes first, so an int8 base's dequantized weight copies never
        # outweigh what it saves): if all of them together do not fit, fewer will not either
        if index == 0 and fit_peak(everything, fast) > budget:
            break
    base = replace(settings, gradient_checkpointing=True, offload=True)
    for description, change in _fsdp_candidates(settings):
        if fit_peak(replace(base, **change), fast) <= budget:
            return ["gradient_checkpointing: true", "offload: true", description], notes
    return ["does not fit even with every option; use a GPU with more memory"], notes


def _describe(settings: PlanSettings) -> dict:
    return {"dtype": settings.dtype, "quantize": settings.quantize, "batch_size": settings.batch_size,
            "gradient_checkpointing": settings.gradient_checkpointing, "offload": settings.offload,
            "processes": settings.processes, "optimizer": settings.optimizer, "device": settings.device,
            "schedule": settings.schedule.describe()}


def format_table(result: dict) -> str:
    lines = [f"plan for {result['teacher']}: {result['height']}x{result['width']}"
             + (f"x{result['num_frames']} frames" if result.get("num_frames") else "")
             + f", latent {tuple(result['latent_shape'])}, {result['base_parameters'] / 1e9:.2f} B base parameters",
             "  " + ", ".join(f"{k} {v}" for k, v in result["settings"].items())]
    if result.get("assumed"):
        lines.append("  assumed (not given): " + "; ".join(result["assumed"]))
    lines.append("")
    lines.append(f"{'component':46} {'GiB':>9}  {'counts in':15} note")
    for row in result["components"]:
        lines.append(f"{row['name']:46} {row['bytes'] / GIB:9.3f}  {row['counts_in']:15} {row['note']}")
    lines.append("")
    lines.append(f"{'training peak':46} {result['training_peak_bytes'] / GIB:9.3f}")
    lines.append(f"{'inference peak (teacher sampling)':46} {result['inference_peak_bytes'] / GIB:9.3f}")
    lines.append(f"{'peak (training, or loading all components)':46} {result['peak_bytes'] / GIB:9.3f}")
    if result["fits"] is None:
        lines.append("no GPU visible: pass --gpu-memory GiB to check a budget")
    else:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {result['budget_bytes'] / GIB:.1f} GiB")
        if result["suggestions"]:
            lines.append("to fit: " + "; ".join(result["suggestions"]))
        lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def refuse_if_too_big(config, gpu_memory_gib: float | None = None, processes: int = 1) -> dict | None:
    """``train``'s gate, before anything is loaded: plan the config and raise ValueError naming the fix when it
    cannot fit ``gpu_memory_gib`` (default: the visible GPU). No budget (a CPU run) or the built-in teacher: no
    check, None."""
    if config.teacher == "builtin":
        return None
    budget = round(gpu_memory_gib * GIB) if gpu_memory_gib else visible_gpu_bytes()
    if budget is None:
        return None
    settings = PlanSettings.from_config(config, processes=processes,
                                        device="cuda" if torch.cuda.is_available() or gpu_memory_gib else "cpu")
    result = plan(settings, budget)
    if not result["fits"]:
        raise ValueError(f"this run needs {result['peak_bytes'] / GIB:.1f} GiB at its peak but the budget is "
                         f"{budget / GIB:.1f} GiB; to fit: {'; '.join(result['suggestions'] + result['notes'])} "
                         f"(details: python -m pdmd plan --config FILE)")
    return result
