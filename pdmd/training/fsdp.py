"""FSDP2 for teams: the frozen base sharded across processes with PyTorch's ``fully_shard``, applied here in our
own code so the same path runs under ``accelerate launch`` on GPUs (NCCL) and under ``torchrun`` / ``accelerate
launch --multi_gpu`` on CPU processes (gloo). accelerate's own FSDP plugin does not engage on a CPU-only machine.

Only the base is sharded: each transformer block and each network root is a ``fully_shard`` unit whose LoRA
parameters are ``ignored_params``, so the adapters stay whole on every rank, are all-reduced by the trainer as
under DDP, and are checkpointed exactly as in a one-process run.

No device ever holds the whole base: the teacher loads into host memory (``load_teacher_on_cpu``), the adapters
are injected there, and ``fully_shard`` moves each unit to the rank's device as it shards it (so a device holds
its shards plus one unit whole, briefly); the adapters follow. Every tensor handed to a collective lives on that
device too: NCCL has no CPU tensors. A quantized base is refused (``TrainConfig``): torchao's int8 and fp8
tensors implement none of the ops ``fully_shard`` splits a parameter with (aten.split, new_zeros; torch 2.13).
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


def load_teacher_on_cpu(config, device: torch.device):
    """``config``'s teacher in host memory, in the dtype ``load_teacher`` would give it on ``device`` (bf16 on
    CUDA unless the config names one), for ``shard_frozen_base`` to place on ``device`` shard by shard. Its text
    encoders and VAE are offloaded: the encoders are borrowed by the device once, to embed the prompts, and the
    VAE is not used while a sharded run trains (it draws no samples)."""
    from pdmd.teachers import load_teacher

    options = config.teacher_options()
    if config.teacher != "builtin":
        options = {"dtype": torch.bfloat16 if device.type == "cuda" else torch.float32, **options, "offload": True}
    return load_teacher(config.teacher, device="cpu", **options)


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


def _devices(module: nn.Module) -> list[str]:
    """Every device that holds a parameter (its local shard) or buffer of ``module``."""
    from torch.distributed.tensor import DTensor
    tensors = [p.to_local() if isinstance(p, DTensor) else p for p in module.parameters()]
    return sorted({str(t.device) for t in [*tensors, *module.buffers()]})


def shard_frozen_base(teacher, accelerator, run_dir: Path | None = None) -> dict:
    """Apply ``fully_shard`` to every block and network root of ``teacher.model`` (adapters already injected),
    which moves each unit to this rank's device as it shards it, then move the adapters there too; record what
    this rank holds in ``run_dir/fsdp-rank-N.json``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = accelerator.num_processes
    if world < 2 or not dist.is_initialized():
        raise FsdpError("fsdp: true shards the base across processes and needs 2 or more: launch with "
                        "accelerate launch --config_file configs/accelerate/fsdp2.yaml (GPUs) or torchrun --nproc_per_node N")
    device = accelerator.device
    mesh = init_device_mesh(device.type, (world,))
    for network in _networks(teacher):
        adapters = {p for n, p in network.named_parameters() if "lora_" in n}
        for blocks in (m for m in network.children() if isinstance(m, nn.ModuleList)):
            for block in blocks:
                fully_shard(block, mesh=mesh, ignored_params=adapters & set(block.parameters()))
        # the root reshards after its forward too (FSDP2 would keep it gathered until a backward): gathered
        # parameters left between forwards are resharded by the main rank alone when it checkpoints (a
        # state_dict hook), and the next forward's gathers would no longer pair across ranks
        fully_shard(network, mesh=mesh, ignored_params=adapters, reshard_after_forward=True)
        for param in adapters:  # fully_shard leaves ignored parameters where they are
            param.data = param.data.to(device)
    if teacher.network_names:
        _run_networks_in_step(teacher)
    local, full = local_base_bytes(teacher.model)
    facts = {"rank": accelerator.process_index, "processes": world, "local_base_bytes": local,
             "full_base_bytes": full, "devices": _devices(teacher.model)}
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

    def velocity(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        times = teacher.timesteps(t, x)
        names = [teacher.network_at(v) for v in times.tolist()]
        # on the networks' device, where the collective's backend (NCCL) can read it
        wanted = torch.tensor([float(name in names) for name in teacher.network_names], device=x.device)
        dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
        out, extra = torch.zeros_like(x), x.new_zeros(())
        timestep = times * 1000
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

    teacher.velocity = velocity
