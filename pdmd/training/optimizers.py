"""The adapters' optimizers: torch's AdamW, or torchao's AdamW8bit (8-bit blockwise states, a quarter of the
memory of fp32 states) and their states as plain tensors for the safetensors checkpoints.

AdamW8bit keeps exp_avg and exp_avg_sq as ``OptimState8bit`` tensors (uint8 codes, one float32 scale per 256
values, a 256-entry lookup table) for tensors of at least 4096 values; they are saved as those component tensors,
so a resumed run continues from exactly the state it stopped with. torchao compiles its update per parameter shape
with ``torch.compile``; on the CPU that compile (a C++ build per shape) costs more than the eager update saves, so
there the update runs eagerly.
"""
from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
_COMPONENTS = ("codes", "scale", "qmap", "signed")  # one OptimState8bit, as saved


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from torchao.optim import AdamW8bit

    class EagerOnCpu(AdamW8bit):
        def step(self, closure=None):
            on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
            if not on_cpu:
                return super().step(closure)
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return EagerOnCpu(params, lr=lr, weight_decay=weight_decay)


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


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
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
