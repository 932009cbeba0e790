"""The adapters' optimizers: torch's AdamW, or torchao's AdamW8bit (8-bit blockwise states, a quarter of the
memory of fp32 states) and their states as plain tensors for the safetensors checkpoints.

AdamW8bit keeps exp_avg and exp_avg_sq as ``OptimState8bit`` tensors (uint8 codes, one float32 scale per 256
values, a 256-entry lookup table) for tensors of at least 4096 values; they are saved as those component tensors,
so a resumed run continues from exactly the state it stopped with. torchao compiles its update per parameter shape
with ``torch.compile``, whose GPU kernels are Triton's: on CUDA that needs the ``triton`` package (torch's CUDA
wheels for Linux bring it). Where it is missing, and on the CPU, where the compile (a C++ build per shape) costs
more than the eager update saves, the update runs eagerly.
"""
from __future__ import annotations

import importlib.util

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
_COMPONENTS = ("codes", "scale", "qmap", "signed")  # one OptimState8bit, as saved


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from torchao.optim import AdamW8bit

    class EagerUnlessCompiled(AdamW8bit):
        def step(self, closure=None):
            if compiles_update([p for group in self.param_groups for p in group["params"]]):
                return super().step(closure)
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return EagerUnlessCompiled(params, lr=lr, weight_decay=weight_decay)


def compiles_update(params: list[torch.nn.Parameter]) -> bool:
    """Whether AdamW8bit's update of ``params`` runs compiled: off the CPU, with Triton installed."""
    return all(p.device.type != "cpu" for p in params) and importlib.util.find_spec("triton") is not None


def _is_8bit(value) -> bool:
    return type(value).__name__ == "OptimState8bit"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An Adam-style optimizer's per-parameter state as flat named tensors (8-bit states as their components)."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if _is_8bit(value):
                for part in _COMPONENTS:
                    tensors[f"{index}.{key}.{part}"] = torch.as_tensor(getattr(value, part)).clone()
            else:
                tensors[f"{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors


def optimizers_tensors(optimizers: dict) -> dict[str, torch.Tensor]:
    """The states of named (accelerate-wrapped) optimizers under ``optimizer/<name>/``, as a checkpoint holds them."""
    return {f"optimizer/{name}/{key}": value for name, wrapped in optimizers.items()
            for key, value in optimizer_tensors(wrapped.optimizer).items()}


def load_optimizers_tensors(optimizers: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of ``optimizers_tensors`` (other keys are ignored; an optimizer with none keeps its state)."""
    for name, wrapped in optimizers.items():
        prefix = f"optimizer/{name}/"
        if state := {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}:
            load_optimizer_tensors(wrapped.optimizer, state)


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of ``optimizer_tensors``. torch's ``load_state_dict`` puts each state on its parameter's device
    and, but for the step count, in its dtype."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for entry in state.values():
        for key in [k for k in entry if k.endswith(".codes")]:
            stem = key[: -len(".codes")]
            parts = {part: entry.pop(f"{stem}.{part}") for part in _COMPONENTS}
            from torchao.optim.subclass_8bit import OptimState8bit
            entry[stem] = OptimState8bit(parts["codes"], parts["scale"], parts["qmap"], bool(parts["signed"]))
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)
