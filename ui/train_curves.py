"""The Train tab's curves: the losses per step and the probe measurements (adherence, FD) per training second,
as gr.LinePlot frames, and the probe's latest figures as one line."""
from __future__ import annotations

import math

import pandas as pd


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def loss_frames(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generator and fake-score loss per step, one curve per phase (gr.LinePlot's long format); the updates of a
    regression warm start have neither (NaN in RunFolder's rows) and are left out."""
    frames = []
    for key in ("loss_generator", "loss_fake"):
        kept = [r for r in rows if math.isfinite(r[key])]
        frames.append(pd.DataFrame({"step": [r["step"] for r in kept], "loss": [r[key] for r in kept],
                                    "phase": [f"phase {r['phase']}" for r in kept]}))
    return tuple(frames)


def probe_frames(probes: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Adherence and FD against training seconds (RunFolder.probes() rows)."""
    seconds = [r["seconds"] for r in probes]
    return tuple(pd.DataFrame({"seconds": seconds, key: [r[key] for r in probes]}) for key in ("adherence", "fd"))


def probe_line(probes: list[dict]) -> str:
    """The latest measurement, e.g. 'probe at step 300 (4 min 40 s): adherence 0.93, FD 9.1'; '' before the first."""
    if not probes:
        return ""
    last = probes[-1]
    return (f"probe at step {last['step']} ({duration(last['seconds'])}): adherence {last['adherence']:.2f}, "
            f"FD {last['fd']:.1f}")
