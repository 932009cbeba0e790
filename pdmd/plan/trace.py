"""Peak bytes of live tensors while code runs: a dispatch mode that sees every tensor an operator creates and
when its storage dies. On meta tensors it gives the memory a real run would allocate without allocating it;
on real CPU tensors it is the CPU's counterpart of ``torch.cuda.max_memory_allocated``."""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LivePeak(TorchDispatchMode):
    """``with LivePeak() as live: ...`` then ``live.peak``: the most bytes that tensors created inside the block
    held at once (tensors that existed before are not counted; views and in-place results add nothing)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._seen: set[int] = set()

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the storage itself, whichever Python wrapper points at it
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                  and _plain(t)}
        for tensor in tree_flatten(out)[0]:
            # a view or an in-place result allocates nothing (and may share a tensor made before the block)
            if isinstance(tensor, torch.Tensor) and _plain(tensor) and not tensor._is_view():
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs:
                    self._track(storage)
        return out


def _plain(tensor: torch.Tensor) -> bool:
    """Dense tensors only: a quantized subclass's inner tensors are seen when they are made."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


class _FusedAttention(torch.autograd.Function):
    """The memory of a fused attention kernel (flash / memory-efficient on CUDA, the flash kernel torch runs on the
    CPU): it keeps q, k, v, the output and one float32 log-sum-exp per query, never the L x L scores. On the meta
    device torch would trace the unfused math path instead, which no real run takes."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def fused_attention(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


@contextmanager
def meta_attention():
    """Within the block, scaled_dot_product_attention allocates what a fused kernel would (meta tensors only)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fused_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
