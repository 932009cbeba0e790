"""ZeroGPU: on a Hugging Face Space with ZeroGPU hardware every GPU call runs inside a ``spaces.GPU`` function,
which borrows a GPU for the call; elsewhere the same code runs as a plain call.

The one GPU call of the app is ui.comparison.sample_side (a teacher's or a student's sample with its boundary
states; the seed grid is two of them), so it is the one call wrapped. Its duration is sized to the request --
NFE x prompts x a per-step estimate -- so a few-step student asks for seconds and gets queue priority over a
many-step teacher. ``spaces`` is optional: without it, or off ZeroGPU, nothing changes. The decision is made at
import, as ZeroGPU needs its GPU functions declared before the app starts.
"""
from __future__ import annotations

import math

from pdmd import limits


def on_zero_gpu() -> bool:
    """True on ZeroGPU hardware: the ``spaces`` package is importable and says so (SPACES_ZERO_GPU)."""
    try:
        import spaces
    except ImportError:
        return False
    config = getattr(getattr(spaces, "config", None), "Config", None)
    return bool(getattr(config, "zero_gpu", False))


def gpu_seconds(nfe: int, prompts: int, video: bool) -> int:
    """The GPU time asked for one sampling call, within [GPU_MIN_S, GPU_MAX_S]."""
    per_step = limits.GPU_VIDEO_STEP_S if video else limits.GPU_IMAGE_STEP_S
    wanted = limits.GPU_BASE_S + nfe * max(1, prompts) * per_step
    return int(min(limits.GPU_MAX_S, max(limits.GPU_MIN_S, math.ceil(wanted))))


def _call(function, *args, seconds: int, **kwargs):
    return function(*args, **kwargs)


def _duration(function, *args, seconds: int, **kwargs) -> int:  # spaces' dynamic duration: same arguments
    return seconds


def _declare():
    if not on_zero_gpu():
        return None
    import spaces
    return spaces.GPU(duration=_duration)(_call)


_ON_GPU = _declare()


def run_on_gpu(function, *args, seconds: int, **kwargs):
    """``function(*args, **kwargs)``: inside spaces.GPU for ``seconds`` on ZeroGPU, a plain call elsewhere."""
    if _ON_GPU is None:
        return function(*args, **kwargs)
    return _ON_GPU(function, *args, seconds=seconds, **kwargs)
