"""A network with each stack of blocks cut to one block per kind, and its full depth recovered from them.

Casting, quantizing and injecting LoRA cost time per layer and tracing costs Python time per operator, so a 30-60
block transformer taken whole makes a plan take minutes. Blocks are of one kind when their parameters and buffers
have the same names, shapes and dtypes (SD3.5-medium's inner blocks: 12 with a second attention, 10 without); a
stack's first and last blocks, its ``ends``, are kept apart (the first block's input carries no gradient; SD3's
last block keeps no text stream). ``Layout.cut`` leaves the ends and one block of each other kind in the network;
then

- a sum over modules (bytes, parameters) at full depth is the cut network's plus, per kind, (count - 1) times its
  block's (``total``);
- a trace runs the network at full depth with every position of a stack replaying the memory of its kind's block
  (``replayed``; pdmd.plan.replay), so every moment of the real step is there, in order. (Extrapolating traces of
  shortened stacks linearly is not enough: the peak moves from one moment to another as the depth grows, as with
  an int8 base under checkpointing, where one block's dequantized weights lead in a short stack.)

tests/test_plan.py compares both with the whole network.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from torch import nn


def block_stacks(network: nn.Module) -> list[str]:
    """Names of the top-level ModuleLists of blocks (``blocks``, ``transformer_blocks``, ...)."""
    return [name for name, child in network.named_children() if isinstance(child, nn.ModuleList) and len(child) > 1]


def _kind(block: nn.Module) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in (*block.named_parameters(), *block.named_buffers()))


@dataclass
class Stack:
    name: str
    ends: list[nn.Module]               # the first and last blocks
    kinds: list[tuple[nn.Module, int]]  # (one block of each other kind, how many blocks of that kind the stack has)
    order: list[int]                    # the kind (index into kinds) of each block between the ends, in order

    def cut(self) -> list[nn.Module]:
        return [self.ends[0], *(block for block, _ in self.kinds), self.ends[1]]


class Layout:
    """``network``'s block stacks; ``cut()`` leaves only one block per kind in the network (for good)."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.is_cut = False
        self.memo: dict = {}  # what each kind of block call holds (pdmd.plan.replay), shared by its positions
        self.stacks = []
        for name in block_stacks(network):
            blocks = list(getattr(network, name))
            kinds: dict[tuple, int] = {}
            order = [kinds.setdefault(_kind(block), len(kinds)) for block in blocks[1:-1]]
            representatives = {index: blocks[1 + order.index(index)] for index in kinds.values()}
            self.stacks.append(Stack(name, [blocks[0], blocks[-1]],
                                     [(representatives[index], order.count(index)) for index in kinds.values()],
                                     order))

    def cut(self) -> None:
        for stack in self.stacks:
            setattr(self.network, stack.name, nn.ModuleList(stack.cut()))
        self.is_cut = True

    def total(self, count: Callable[[nn.Module], int]) -> int:
        """``count`` (a function of a module that adds up over its submodules) over the network at full depth."""
        if not self.is_cut:
            return count(self.network)
        return count(self.network) + sum((n - 1) * count(block) for stack in self.stacks for block, n in stack.kinds)

    @contextmanager
    def replayed(self):
        """Within the block, each stack holds its full depth again, every position a block replaying the memory
        of its kind's (pdmd.plan.replay)."""
        from pdmd.plan.replay import Replayed

        originals = {stack.name: getattr(self.network, stack.name) for stack in self.stacks}
        try:
            for stack in self.stacks:
                blocks = [stack.ends[0], *(stack.kinds[kind][0] for kind in stack.order), stack.ends[1]]
                setattr(self.network, stack.name, nn.ModuleList(Replayed(block, self.memo, self.network)
                                                                for block in blocks))
            yield
        finally:
            for name, stack in originals.items():
                setattr(self.network, name, stack)
