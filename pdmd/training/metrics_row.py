"""One update's row of metrics.jsonl (read back by pdmd.training.run_folder) and its progress-bar summary."""
from __future__ import annotations

import time

import torch

LOSS_NAMES = {"g": "loss_generator", "f": "loss_fake", "r": "loss_regression"}  # the progress bar's short names


def metrics_row(step: int, phase: int, started: float, grad_norm: float | None, generator_optimizer, device,
                scaler=None, skipped_updates: int = 0, **losses) -> dict:
    """The update's losses and diagnostics beside its step, 1-based phase, the generator's rate, speed and peak
    memory; under fp16 (a GradScaler) also the loss scale and how many of the update's steps it skipped (grad_norm
    is null when it skipped the generator's)."""
    return {"step": step, "phase": phase + 1, **losses, "grad_norm": grad_norm,
            "lr_generator": float(generator_optimizer.param_groups[0]["lr"]),  # torchao's is a tensor
            "it_per_s": 1.0 / (time.perf_counter() - started), "memory_mb": peak_memory_mb(device),
            **({"grad_scale": scaler.get_scale(), "skipped_updates": skipped_updates} if scaler else {})}


def progress_postfix(row: dict) -> dict:
    return {"phase": row["phase"], **{short: f"{row[key]:.3g}" for short, key in LOSS_NAMES.items() if key in row}}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
