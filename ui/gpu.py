"""ZeroGPU: on a Hugging Face Space with ZeroGPU hardware every GPU call runs inside a ``spaces.GPU`` function,
which borrows a GPU for the call; elsewhere the same code runs as a plain call.

On ZeroGPU the call runs in a worker process forked from the app's, and ``spaces`` hands every argument and result
across by pickle: so the one GPU call of the app (ui.comparison._sample_side, one side of a comparison) takes plain
values naming its model and its rows (prompts, seeds, condition images as PIL images), finds the model in the
worker's copy of the model store (ui.models.store_by_id), and returns CPU tensors, PIL images and numbers. No
callback crosses, so live progress is dropped there. Its duration is sized to the request -- network evaluations
(CFG counted) x images x a per-evaluation estimate -- so a few-step student asks for seconds and gets queue
priority over a many-step teacher. ``spaces`` is optional: without it, or
off ZeroGPU, nothing changes. The decision is made at import, as ZeroGPU needs its GPU functions declared before
the app starts (and ``spaces`` imported before anything touches CUDA: ui.models imports this module).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from pdmd import limits


def on_zero_gpu() -> bool:
    """True on ZeroGPU hardware: the ``spaces`` package is importable and says so (SPACES_ZERO_GPU)."""
    try:
        import spaces
    except ImportError:
        return False
    config = getattr(getattr(spaces, "config", None), "Config", None)
    return bool(getattr(config, "zero_gpu", False))


def evaluations(steps: Sequence[int], cfg: Sequence[float], guidance_input: bool) -> int:
    """Network evaluations of one sample: one per Euler step, two where a phase runs classifier-free guidance
    (cfg != 1: the conditional and the unconditional branch) -- unless guidance is a network input (FLUX.1-dev,
    Teacher.guidance_embedded), which takes one. The rule pdmd.core.sampling counts NFE by."""
    return sum(n * (1 if guidance_input or scale == 1.0 else 2) for n, scale in zip(steps, cfg))


def gpu_seconds(nfe: int, images: int, video: bool) -> int:
    """The GPU time asked for one sampling call of ``images`` samples, each costing ``nfe`` network evaluations
    with CFG counted (``evaluations``), within [GPU_MIN_S, GPU_MAX_S]."""
    per_evaluation = limits.GPU_VIDEO_STEP_S if video else limits.GPU_IMAGE_STEP_S
    wanted = limits.GPU_BASE_S + nfe * max(1, images) * per_evaluation
    return int(min(limits.GPU_MAX_S, max(limits.GPU_MIN_S, math.ceil(wanted))))


def images_within(nfe: int, video: bool) -> int:
    """The most images one call may sample (at ``nfe`` evaluations each) in the GPU_MAX_S a call can get."""
    per_evaluation = limits.GPU_VIDEO_STEP_S if video else limits.GPU_IMAGE_STEP_S
    return max(1, math.floor((limits.GPU_MAX_S - limits.GPU_BASE_S) / (nfe * per_evaluation)))


def _call(function, *args, seconds: int):
    return function(*args)


def _duration(function, *args, seconds: int) -> int:  # spaces' dynamic duration: same arguments
    return seconds


def _declare():
    if not on_zero_gpu():
        return None
    import spaces
    return spaces.GPU(duration=_duration)(_call)


_ON_GPU = _declare()


def run_on_gpu(function, *args, seconds: int, on_step=None):
    """``function(*args, on_step=on_step)`` as a plain call; on ZeroGPU ``function(*args)`` inside spaces.GPU for
    ``seconds``, in the worker: ``function`` and ``args`` must pickle, and ``on_step`` (a live progress callback,
    which cannot cross into the worker) is dropped."""
    if _ON_GPU is None:
        return function(*args, on_step=on_step)
    return _ON_GPU(function, *args, seconds=seconds)
