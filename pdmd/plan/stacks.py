"""A faster activation trace: trace the transformer with each stack of blocks cut short, and extrapolate.

Tracing on the meta device costs Python time per operator, so a 30-60 block transformer takes minutes per traced
setting. The memory of a stack of blocks grows by a fixed amount per block of one kind (each block saves the same
activations, or one checkpointed input, and the peak falls at the same relative point of the backward). So the
network is traced with every stack cut to its first and last blocks (``base``: the ends of a stack can differ, as
SD3's last block keeps no text stream), then, for each kind of inner block, with one block of that kind between
them; a kind occurring ``n`` times adds ``n`` times its difference to ``base``. Blocks are of one kind when their
parameters have the same names and shapes (SD3.5-medium's inner blocks: 12 with a second attention, 10 without).
tests/test_plan.py compares this with the full trace.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def block_stacks(network: nn.Module) -> list[str]:
    """Names of the top-level ModuleLists of blocks (``blocks``, ``transformer_blocks``, ...)."""
    return [name for name, child in network.named_children() if isinstance(child, nn.ModuleList) and len(child) > 1]


@contextmanager
def shortened(network: nn.Module, stacks: dict[str, list[nn.Module]]):
    """Within the block, each named stack of ``network`` holds only the given blocks."""
    originals = {name: getattr(network, name) for name in stacks}
    try:
        for name, blocks in stacks.items():
            setattr(network, name, nn.ModuleList(blocks))
        yield
    finally:
        for name, stack in originals.items():
            setattr(network, name, stack)


def _kind(block: nn.Module) -> tuple:
    return tuple((name, tuple(param.shape)) for name, param in block.named_parameters())


def extrapolated(network: nn.Module, trace) -> dict[str, int]:
    """``trace()`` (a dict of peak bytes) at ``network``'s real stacks, from traces of shortened ones."""
    stacks = {name: list(getattr(network, name)) for name in block_stacks(network)}
    ends = {name: [blocks[0], blocks[-1]] for name, blocks in stacks.items()}
    with shortened(network, ends):
        base = trace()
    total = dict(base)
    for name, blocks in stacks.items():
        kinds: dict[tuple, list[nn.Module]] = {}
        for block in blocks[1:-1]:
            kinds.setdefault(_kind(block), []).append(block)
        for members in kinds.values():
            with shortened(network, {**ends, name: [blocks[0], members[0], blocks[-1]]}):
                three = trace()
            for key in total:
                total[key] += len(members) * (three[key] - base[key])
    return total
