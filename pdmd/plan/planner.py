"""The plan: the component table, the peaks, whether they fit a memory budget, and the cheapest changes that
make a run fit (tried in order of what they cost the run: speed first, then quality, then hardware)."""
from __future__ import annotations

from dataclasses import replace

import torch

from pdmd.plan.memory import PlanSettings, components, peaks

GIB = 2**30


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
        yield "quantize: nf4", dict(quantize="nf4")
    frames = facts.get("num_frames")
    if frames and frames > 17:
        yield "num_frames: 17", dict(num_frames=17)
    height, width = facts["height"], facts["width"]
    for scale in (0.75, 0.5):  # rounded to 16 pixels, the largest multiple any family needs
        size = dict(height=max(16, int(height * scale) // 16 * 16), width=max(16, int(width * scale) // 16 * 16))
        yield f"height: {size['height']}, width: {size['width']}", size


def _fsdp_candidates(settings: PlanSettings):
    if settings.quantize != "nf4":
        for n in (2, 4, 8):
            if n > settings.processes:
                yield f"fsdp over {n} GPUs", dict(processes=n)


def plan(settings: PlanSettings, budget: int | None = None, suggest: bool = True, fast: bool = False) -> dict:
    """One object: ``components``, ``peak_bytes`` (training), ``inference_peak_bytes``, ``budget_bytes``, ``fits``
    (None without a budget) and ``suggestions`` (the changes, applied together, that make it fit). ``fast``: the
    activations extrapolated from shortened block stacks (pdmd.plan.stacks)."""
    rows, facts = components(settings, fast)
    result_peaks = peaks(rows)
    fits = None if budget is None else result_peaks["peak"] <= budget
    suggestions: list[str] = []
    if fits is False and suggest:
        suggestions = _cheapest_fix(settings, facts, budget, fast)
    return {"teacher": settings.teacher, "settings": _describe(settings), **facts,
            "components": [{"name": r.name, "bytes": r.bytes, "gib": round(r.bytes / GIB, 3), "counts_in": r.when,
                            "note": r.note} for r in rows],
            "peak_bytes": result_peaks["peak"], "training_peak_bytes": result_peaks["training"],
            "inference_peak_bytes": result_peaks["inference"], "budget_bytes": budget, "fits": fits,
            "suggestions": suggestions}


def _cheapest_fix(settings: PlanSettings, facts: dict, budget: int, fast: bool) -> list[str]:
    """Single-device changes first (accumulated), then FSDP on top of checkpointing and offload."""
    applied, current = [], settings
    for description, change in _candidates(settings, facts):
        current = replace(current, **change)
        applied.append(description)
        if peaks(components(current, fast)[0])["peak"] <= budget:
            return applied
    base = replace(settings, gradient_checkpointing=True, offload=True)
    for description, change in _fsdp_candidates(settings):
        if peaks(components(replace(base, **change), fast)[0])["peak"] <= budget:
            return ["gradient_checkpointing: true", "offload: true", description]
    return ["does not fit even with every option; use a GPU with more memory"]


def _describe(settings: PlanSettings) -> dict:
    return {"dtype": settings.dtype, "quantize": settings.quantize, "batch_size": settings.batch_size,
            "gradient_checkpointing": settings.gradient_checkpointing, "offload": settings.offload,
            "processes": settings.processes, "optimizer": settings.optimizer, "device": settings.device,
            "schedule": settings.schedule.describe()}


def format_table(result: dict) -> str:
    lines = [f"plan for {result['teacher']}: {result['height']}x{result['width']}"
             + (f"x{result['num_frames']} frames" if result.get("num_frames") else "")
             + f", latent {tuple(result['latent_shape'])}, {result['base_parameters'] / 1e9:.2f} B base parameters",
             "  " + ", ".join(f"{k} {v}" for k, v in result["settings"].items()), ""]
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
                         f"{budget / GIB:.1f} GiB; to fit: {'; '.join(result['suggestions'])} "
                         f"(details: python -m pdmd plan --config FILE)")
    return result
