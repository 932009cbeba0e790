"""Trainer processes as the job manager sees them: a pid *and* its kernel start time, so a pid the kernel reused
for another program is never mistaken for our trainer (nor killed); and the defaults a job runs with."""
from __future__ import annotations

import os
from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a live process (clock ticks since boot); None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError, ValueError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def is_alive(pid: int | None, started: int | None) -> bool:
    return bool(pid) and started is not None and process_start_time(pid) == started


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def default_threads() -> int:
    """Torch threads of a job: 1 unless PDMD_TRAIN_THREADS says otherwise -- on a 2-core host one core
    trains and the other keeps the app answering."""
    try:
        return max(1, int(os.environ.get("PDMD_TRAIN_THREADS", "1")))
    except ValueError:
        return 1
