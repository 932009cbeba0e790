"""Blocks that replay their memory, so an activation trace runs a network at its full depth for the cost of a few
blocks (pdmd.plan.stacks puts one at every position of a stack).

A transformer block called again with the same inputs (shapes, dtypes, which need gradients), the same adapter
active and the same adapters trainable allocates the same memory each time. So the first such call of a block
kind runs the real block on its own (``measure_no_grad``, ``measure_grad``: the trace around it sees none of it)
and records what a call holds: its outputs, the peak of its forward with and without gradients, what its autograd graph keeps (the bytes
of the tensors it saves, and which of its inputs and outputs it keeps alive), the rise of its backward and the
gradients the backward makes. Every call, that one included, is then replayed by ``_Replay``, an autograd
function allocating those amounts on the meta device, so the trace around it (LivePeak) sees what the real block
would allocate, in the same order relative to the rest of the step, at every one of the network's positions.

Under gradient checkpointing the network calls each block through torch.utils.checkpoint; a replaying block then
keeps only its inputs, as the checkpoint does for its recomputation, and its backward replays what the real
block's checkpointed backward holds, recomputation included (measured through torch.utils.checkpoint itself,
which stops a recomputation early).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

from pdmd.plan.trace import LivePeak


@dataclass
class _Profile:
    """What one kind of call of a block holds; each half measured when a call first needs it."""
    outputs: list | None = None    # per output leaf: a tensor's (size, stride, dtype, needs grad, storage, offset),
                                   # else the value
    storages: list = None          # (bytes, dtype) of each storage the output tensors view
    spec: object = None            # the outputs' structure
    returned_inputs: dict | None = None  # output leaf index -> input tensor index, where the block returns an input
    no_grad_peak: int | None = None  # peak of a forward without gradients (outputs included)
    forward_peak: int | None = None  # peak of a forward with gradients (outputs and saved tensors included)
    retained: int = 0              # bytes of the tensors the graph saves, outputs aside
    kept_inputs: tuple = ()        # indices of the input tensors the graph saves
    kept_outputs: tuple = ()       # indices of the output leaves the graph saves
    backward_rise: int = 0         # peak of the backward above what was alive at its start
    input_grads: tuple = ()        # indices of the input tensors that get a gradient
    trainable: tuple = ()          # (size, stride, dtype) of each parameter that gets a gradient
    checkpointed_peak: int | None = None  # the same two peaks when called through torch.utils.checkpoint
    checkpointed_rise: int = 0


def _meta(tensor: torch.Tensor) -> tuple:
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.requires_grad


class _Adapters:
    """A block's LoRA layers and parameters by adapter, looked up once (Roles switches every layer alike)."""

    def __init__(self, block: nn.Module):
        self.layer = next((m for m in block.modules() if isinstance(m, BaseTunerLayer)), None)
        lora = [(n, p) for n, p in block.named_parameters() if "lora_" in n]
        names = list(self.layer.lora_A.keys()) if self.layer is not None else []
        self.params = {name: [p for n, p in lora if f".{name}." in n] for name in names}

    def state(self, grad: bool) -> tuple:
        """What a call's memory depends on: adapters off or on (all have one shape), and with gradients, which
        of the active adapters' parameters are trainable."""
        if self.layer is None:
            return ()
        if not grad or self.layer.disable_adapters:
            return (self.layer.disable_adapters,)
        return False, tuple(p.requires_grad for name in self.layer.active_adapters for p in self.params[name])

    def trainable(self) -> list[nn.Parameter]:
        return [p for name in self.layer.active_adapters for p in self.params[name]] if self.layer else []

    def trainable_now(self) -> bool:
        return bool(self.layer) and not self.layer.disable_adapters and any(p.requires_grad for p in self.trainable())


def _fresh(leaves: list, spec):
    """New meta tensors like the call's input tensors: (all leaves, args, kwargs)."""
    copies = [torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device=leaf.device)
              .requires_grad_(leaf.requires_grad) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    args, kwargs = tree_unflatten(copies, spec)
    return copies, args, kwargs


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def measure_no_grad(profile: _Profile, block: nn.Module, leaves: list, spec) -> None:
    """Run ``block`` without gradients on fresh copies of its inputs, alone (the modes of the trace around it are
    off), and record its outputs and peak."""
    with _disable_current_modes():
        copies, args, kwargs = _fresh(leaves, spec)
        with torch.no_grad(), LivePeak() as live:
            out = block(*args, **kwargs)
        out_leaves, profile.spec = tree_flatten(out)
        inputs = {_storage(t): index for index, t in enumerate(t for t in copies if isinstance(t, torch.Tensor))}
        profile.returned_inputs = {index: inputs[_storage(t)] for index, t in enumerate(out_leaves)
                                   if isinstance(t, torch.Tensor) and _storage(t) in inputs}
        if profile.outputs is None:
            profile.outputs, profile.storages = _output_metas(out_leaves)
        profile.no_grad_peak = live.peak


def measure_grad(profile: _Profile, block: nn.Module, adapters: _Adapters, leaves: list, spec,
                 checkpointed: bool) -> None:
    """Run ``block`` with gradients, forward and backward (through torch.utils.checkpoint if ``checkpointed``), on
    fresh copies of its inputs, alone, and record what its graph keeps and what its backward makes; the block's
    gradients are left as they were."""
    with _disable_current_modes():
        copies, args, kwargs = _fresh(leaves, spec)
        tensors = [t for t in copies if isinstance(t, torch.Tensor)]
        inputs = {_storage(t): index for index, t in enumerate(tensors)}
        params = [p for p in adapters.trainable() if p.requires_grad]
        before = [p.grad for p in params]
        saved: set[int] = set()

        def pack(tensor):
            saved.add(_storage(tensor))
            return tensor

        with torch.enable_grad(), LivePeak() as live:
            if checkpointed:  # as diffusers calls a block when gradient checkpointing is on
                out = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
            else:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = block(*args, **kwargs)
            out_leaves, profile.spec = tree_flatten(out)
            profile.returned_inputs = {index: inputs[_storage(t)] for index, t in enumerate(out_leaves)
                                       if isinstance(t, torch.Tensor) and _storage(t) in inputs}
            profile.outputs, profile.storages = _output_metas(out_leaves)
            own = {_storage(t): t.untyped_storage().nbytes() for t in out_leaves
                   if isinstance(t, torch.Tensor) and _storage(t) not in inputs}
            forward_peak = live.peak
            if not checkpointed:
                profile.retained = live.current - sum(own.values())
                profile.kept_inputs = tuple(i for i, t in enumerate(tensors) if _storage(t) in saved)
                profile.kept_outputs = tuple(i for i, t in enumerate(out_leaves)
                                             if isinstance(t, torch.Tensor) and _storage(t) in saved)
            differentiable = [t for t in out_leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            seeds = [torch.empty_like(t) for t in differentiable]
            start = live.peak = live.current
            torch.autograd.backward(differentiable, seeds)
            rise = live.peak - start
        if checkpointed:
            profile.checkpointed_peak, profile.checkpointed_rise = forward_peak, rise
        else:
            profile.forward_peak, profile.backward_rise = forward_peak, rise
        profile.input_grads = tuple(i for i, t in enumerate(tensors) if t.grad is not None)
        profile.trainable = tuple((p.shape, p.stride(), p.dtype) for p, grad in zip(params, before)
                                  if p.grad is not grad)
        for p, grad in zip(params, before):
            p.grad = grad


def _scratch(nbytes: int) -> None:
    """Hold ``nbytes`` for a moment: a transient the real block allocates and frees."""
    if nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8, device="meta")


def _made(meta: tuple) -> torch.Tensor:
    size, stride, dtype, _ = meta
    return torch.empty_strided(size, stride, dtype=dtype, device="meta")


def _output_metas(out_leaves: list) -> tuple[list, list]:
    """Each output leaf's description and the storages the output tensors view (several may share one)."""
    storages: dict[int, int] = {}
    sizes = []
    metas = []
    for t in out_leaves:
        if not isinstance(t, torch.Tensor):
            metas.append(t)
            continue
        group = storages.setdefault(_storage(t), len(storages))
        if group == len(sizes):
            sizes.append((t.untyped_storage().nbytes(), t.dtype))
        metas.append((t.shape, t.stride(), t.dtype, t.requires_grad, group, t.storage_offset()))
    return metas, sizes


def _made_indices(profile: _Profile) -> list[int]:
    """The output leaves a replay makes: the tensors, but inputs the block returns as they are."""
    return [i for i, m in enumerate(profile.outputs) if isinstance(m, tuple) and i not in profile.returned_inputs]


def _make_outputs(profile: _Profile, made: list[int]) -> tuple[list[torch.Tensor], int]:
    """(fresh tensors like the block's outputs ``made``, their bytes). Outputs viewing one storage (a split of a
    joint text-and-image stream) are made apart, contiguous: views of a tensor made inside an autograd function
    would make autograd gather their gradients into one more tensor."""
    shared = [group for group, _ in enumerate(profile.storages)
              if sum(1 for index in made if profile.outputs[index][4] == group) > 1]
    outputs = []
    for index in made:
        size, stride, dtype, _, group, _ = profile.outputs[index]
        outputs.append(torch.empty(size, dtype=dtype, device="meta") if group in shared
                       else _made((size, stride, dtype, False)))
    return outputs, _storage_bytes(outputs)


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


class _Replay(torch.autograd.Function):
    """A block call's memory: ``tensors`` are its ``count`` input tensors, then stand-ins of the parameters that get
    gradients; ``checkpointed``: called through torch.utils.checkpoint, so nothing is kept for the backward, which
    replays the checkpointed one (recomputation included)."""

    @staticmethod
    def forward(ctx, profile: _Profile, checkpointed: bool, count: int, *tensors):
        made = _made_indices(profile)
        outputs, nbytes = _make_outputs(profile, made)
        if checkpointed:
            _scratch(profile.checkpointed_peak - nbytes)
            ctx.inputs = tensors[:count]  # the checkpoint holds every input for its recomputation, until the backward
        else:
            retained = torch.empty(profile.retained, dtype=torch.uint8, device="meta")
            _scratch(profile.forward_peak - nbytes - profile.retained)
            inputs = tensors[:count]
            ctx.save_for_backward(retained, *(inputs[i] for i in profile.kept_inputs),
                                  *(outputs[made.index(i)] for i in profile.kept_outputs if i in made))
        ctx.profile, ctx.checkpointed, ctx.count = profile, checkpointed, count
        ctx.metas = [_meta(t) for t in tensors]  # the gradients' shapes
        ctx.mark_non_differentiable(*(t for t, i in zip(outputs, made) if not profile.outputs[i][3]))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        profile = ctx.profile
        gets_grad = lambda index: ctx.needs_input_grad[3 + index] and (  # noqa: E731
            index >= ctx.count or index in profile.input_grads)  # parameter stand-ins always do
        grads = [_made(meta) if gets_grad(index) else None for index, meta in enumerate(ctx.metas)]
        rise = profile.checkpointed_rise if ctx.checkpointed else profile.backward_rise
        _scratch(rise - _storage_bytes(g for g in grads if g is not None))
        return (None, None, None, *grads)


class Replayed(nn.Module):
    """One position of a stack, standing for ``block`` (shared with every position of its kind): each kind of
    call is measured once (``memo``, shared) and replayed; this position's gradients go to stand-ins of the
    block's trainable parameters, its own."""

    def __init__(self, block: nn.Module, memo: dict, network: nn.Module):
        super().__init__()
        self.block = block  # a submodule, so Roles still reaches its adapters (parameters are listed once)
        self.__dict__["network"] = network  # not a submodule: its gradient_checkpointing flag says how it calls
        self.memo = memo
        self.adapters = memo.setdefault(("adapters", id(block)), _Adapters(block))  # looked up once per block
        self.stand_ins: dict[tuple, list[torch.Tensor]] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what a network reads off its blocks is the block's (Qwen-Image 2.1's forward
            return getattr(super().__getattr__("block"), name)  # reads each block's attention processor)

    def forward(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        # a call builds a graph when gradients are on and an input or an active adapter needs them
        graph = torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or self.adapters.trainable_now())
        values = tuple(_meta(leaf) if isinstance(leaf, torch.Tensor) else (type(leaf), leaf) for leaf in leaves)
        profile = self.memo.setdefault((id(self.block), spec, values, graph, self.adapters.state(graph)), _Profile())
        checkpointed = graph and getattr(self.network, "gradient_checkpointing", False)  # the network's own test
        if not graph and profile.no_grad_peak is None:
            measure_no_grad(profile, self.block, leaves, spec)
        if graph and (profile.checkpointed_peak if checkpointed else profile.forward_peak) is None:
            measure_grad(profile, self.block, self.adapters, leaves, spec, checkpointed)
        made = _made_indices(profile)
        if graph:
            outputs = list(_Replay.apply(profile, checkpointed, len(tensors), *tensors,
                                         *self._stand_ins(profile.trainable)))
        else:
            outputs, nbytes = _make_outputs(profile, made)
            _scratch(profile.no_grad_peak - nbytes)
        made_outputs = dict(zip(made, outputs))
        out = [tensors[profile.returned_inputs[i]] if i in profile.returned_inputs else made_outputs.get(i, m)
               for i, m in enumerate(profile.outputs)]
        return tree_unflatten(out, profile.spec)

    def _stand_ins(self, metas: tuple) -> list[torch.Tensor]:
        if metas not in self.stand_ins:
            with _disable_current_modes():  # made once, outside the step: not an allocation of the step
                self.stand_ins[metas] = [_made((*meta, False)).requires_grad_(True) for meta in metas]
        return self.stand_ins[metas]

    def drop_gradients(self) -> None:
        for tensors in self.stand_ins.values():
            for tensor in tensors:
                tensor.grad = None
