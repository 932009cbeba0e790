"""A stand-in for Hugging Face's ``spaces`` package on ZeroGPU hardware, for a machine that is not a Space.

The real ``spaces.GPU`` runs its function in a worker process forked from the app's and hands every argument and
result across by pickle (a multiprocessing SimpleQueue each way: ``pickle.dumps`` in, ``pickle.loads`` out). This
stand-in runs the function in this process but sends its arguments and its result through the same round trip,
so whatever could not reach a real worker -- a lock, a closure, a lambda -- fails here too. Two more things are
refused as a ZeroGPU Space refuses them in effect: a torch module among the arguments or the result (a worker
finds its models in its own forked memory; shipping a pipeline per call is not how models get there) and a
tensor on a GPU in the result (the app's process on ZeroGPU has no GPU to receive it).

Put this folder first on ``sys.path`` (or PYTHONPATH) before ``ui.gpu`` is imported. Each call's function name and
requested duration are kept in ``calls`` and, when SPACES_STANDIN_LOG names a file, appended to it as a JSON line.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import types

config = types.SimpleNamespace(Config=types.SimpleNamespace(zero_gpu=True))  # what ui.gpu.on_zero_gpu reads
calls: list[tuple[str, int]] = []  # (function name, seconds asked) per call, in this process


class _WorkerQueuePickler(pickle.Pickler):
    def reducer_override(self, obj):
        import torch
        if isinstance(obj, torch.nn.Module):
            raise pickle.PicklingError(f"a {type(obj).__name__} would cross into the ZeroGPU worker")
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            raise pickle.PicklingError(f"a tensor on {obj.device} would cross out of the ZeroGPU worker")
        return NotImplemented


def across(value):
    """``value`` after a trip through the worker queue."""
    buffer = io.BytesIO()
    _WorkerQueuePickler(buffer).dump(value)
    return pickle.loads(buffer.getvalue())


def GPU(task=None, *, duration=None, size=None):
    """``spaces.GPU`` as used with a dynamic ``duration``: the function runs on the far side of the queue."""
    def declare(function):
        def on_gpu(*args, **kwargs):
            seconds = duration(*args, **kwargs) if callable(duration) else duration
            # ui.gpu declares one trampoline, whose first argument is the function it runs: record that one
            name = getattr(args[0], "__name__", function.__name__) if args else function.__name__
            calls.append((name, seconds))
            if os.environ.get("SPACES_STANDIN_LOG"):
                with open(os.environ["SPACES_STANDIN_LOG"], "a") as log:
                    log.write(json.dumps({"function": name, "seconds": seconds}) + "\n")
            args, kwargs = across((args, kwargs))
            return across(function(*args, **kwargs))
        return on_gpu
    return declare if task is None else declare(task)
