"""FSDP2 for teams: the frozen base sharded across processes with PyTorch's ``fully_shard``, applied here in our
own code so the same path runs under ``accelerate launch`` on GPUs (NCCL) and under ``torchrun`` / ``accelerate
launch --multi_gpu`` on CPU processes (gloo). accelerate's own FSDP plugin does not engage on a CPU-only machine.

Only the base is sharded: each transformer block and each network root is a ``fully_shard`` unit whose LoRA
parameters are ``ignored_params``, so the adapters stay whole on every rank, are all-reduced by the trainer as
under DDP, and are checkpointed exactly as in a one-process run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn


class FsdpError(ValueError):
    """A run that cannot be sharded (one line)."""


def _networks(teacher) -> list[nn.Module]:
    return list(teacher.model.values()) if teacher.network_names else [teacher.model]


def local_base_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of the base this rank holds, bytes of the whole base), LoRA weights excluded; buffers (not sharded)
    count whole in both."""
    from torch.distributed.tensor import DTensor
    local = full = sum(b.numel() * b.element_size() for b in module.buffers())
    for name, param in module.named_parameters():
        if "lora_" in name:
            continue
        full += param.numel() * param.element_size()
        held = param.to_local() if isinstance(param, DTensor) else param
        local += held.numel() * held.element_size()
    return local, full


def shard_frozen_base(teacher, accelerator, run_dir: Path | None = None) -> dict:
    """Apply ``fully_shard`` to every block and network root of ``teacher.model`` (adapters already injected),
    and record what this rank holds in ``run_dir/fsdp-rank-N.json``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = accelerator.num_processes
    if world < 2 or not dist.is_initialized():
        raise FsdpError("fsdp: true shards the base across processes and needs 2 or more: launch with "
                        "accelerate launch --config_file configs/accelerate/fsdp2.yaml (GPUs) or torchrun --nproc_per_node N")
    mesh = init_device_mesh(accelerator.device.type, (world,))
    for network in _networks(teacher):
        adapters = {p for n, p in network.named_parameters() if "lora_" in n}
        for blocks in (m for m in network.children() if isinstance(m, nn.ModuleList)):
            for block in blocks:
                fully_shard(block, mesh=mesh, ignored_params=adapters & set(block.parameters()))
        fully_shard(network, mesh=mesh, ignored_params=adapters)
    if teacher.network_names:
        _run_networks_in_step(teacher)
    local, full = local_base_bytes(teacher.model)
    facts = {"rank": accelerator.process_index, "processes": world, "local_base_bytes": local,
             "full_base_bytes": full}
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"fsdp-rank-{accelerator.process_index}.json").write_text(json.dumps(facts))
    return facts


def _run_networks_in_step(teacher) -> None:
    """A two-network teacher (Wan 2.2) picks a network per sample from its timestep, which differs between
    ranks; a sharded network's forward is a collective every rank must join. So each call runs every network
    that any rank needs, on every rank (on one dummy row where it has none, kept in the graph with weight 0 so
    the backward's gathers match too)."""
    import torch.distributed as dist

    choose = teacher.velocity

    def velocity(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        names = [teacher.network_at(float(v)) for v in teacher.timesteps(t, x)]
        wanted = torch.tensor([float(name in names) for name in teacher.network_names])
        dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
        out, extra = torch.zeros_like(x), x.new_zeros(())
        timestep = teacher.timesteps(t, x) * 1000
        for name, needed in zip(teacher.network_names, wanted.tolist()):
            if not needed:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long, device=x.device)
            dummy = len(rows) == 0
            take = rows if not dummy else torch.zeros(1, dtype=torch.long, device=x.device)
            part = {k: v[take] if isinstance(v, Tensor) else v for k, v in cond.items()}
            result = teacher._run(teacher.model[name], x[take], timestep[take], part)
            if dummy:
                extra = extra + 0 * result.sum()
            else:
                out = out.index_copy(0, rows, result)
        return out + extra

    velocity.unsharded = choose
    teacher.velocity = velocity
