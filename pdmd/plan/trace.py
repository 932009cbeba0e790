"""Peak bytes of live tensors while code runs: a dispatch mode that sees every tensor an operator creates and
when its storage dies. On meta tensors it gives the memory a real run would allocate without allocating it;
on real CPU tensors it is the CPU's counterpart of ``torch.cuda.max_memory_allocated``. Its base, ``MetaReplay``,
makes meta-device work (tracing, and building or quantizing networks on the meta device) fast."""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten


class MetaReplay(TorchDispatchMode):
    """Within the block, an operator on meta tensors called again with the same arguments' metadata returns
    outputs made from a recipe recorded at its first call instead of running its meta kernel (see below)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._dispatch(func, args, kwargs or {})[0]

    def _dispatch(self, func, args, kwargs):
        """(outputs, the fresh tensors among them: neither views nor inputs)."""
        key = _cache_key(func, args, kwargs)
        recipe = _RECIPES.get(key) if key is not None else None
        if recipe is not None:
            return _replay(recipe, args)
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs)) if _plain(t)}
        # a view or an in-place result allocates nothing (and may share a tensor made before the block)
        fresh = [t for t in _tensors(out) if _plain(t) and not t._is_view() and t.untyped_storage()._cdata not in inputs]
        if key is not None and key not in _RECIPES:
            _RECIPES[key] = _recipe(out, args, inputs)
        return out, fresh


class LivePeak(MetaReplay):
    """``with LivePeak() as live: ...`` then ``live.peak``: the most bytes that tensors created inside the block
    held at once (tensors that existed before are not counted; views and in-place results add nothing)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._alive: dict[int, tuple[weakref.ref, int]] = {}  # storage -> (its weak reference, its bytes)

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the storage itself, whichever Python wrapper points at it
        if key in self._alive:
            return
        size = storage.nbytes()
        self._alive[key] = (weakref.ref(storage, lambda _, key=key: self._release(key)), size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        self.current -= self._alive.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out, fresh = self._dispatch(func, args, kwargs or {})
        for tensor in fresh:
            self._track(tensor.untyped_storage())
        return out


def _tensors(value):
    """The tensors in an operator's arguments or outputs (nested lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


# --- replaying operators on the meta device -----------------------------------------------------------------------
# On the meta device an operator's only effect is its outputs' metadata, yet torch's Python meta kernels cost about
# a millisecond a call, and a transformer repeats every call once per block and per step. So the outputs of an
# operator called again with the same arguments' metadata are made from a recipe recorded at its first call:
# fresh tensors by size and stride, views of the first argument by size, stride and offset. Only operators that
# neither mutate their arguments nor depend on randomness or on values qualify, and only while every argument is a
# plain meta tensor or a plain value; any output the recipe cannot describe keeps the operator out of the cache.

class _Uncacheable(Exception):
    pass


_PLAIN_VALUES = (str, torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size, type(None))


def _key(value):
    """A hashable stand-in for an operator argument: meta tensors by their metadata, plain values as they are
    (numbers with their type: ``x * 2`` and ``x * 2.0`` differ on an integer tensor)."""
    kind = type(value)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        if not value.is_meta:
            raise _Uncacheable
        return value.shape, value.stride(), value.dtype, value.storage_offset()
    if kind is int or kind is float or kind is bool:
        return kind, value
    if kind is list or kind is tuple:
        return kind, tuple([_key(item) for item in value])
    if kind in _PLAIN_VALUES:
        return value
    if kind is dict:
        return tuple([(name, _key(item)) for name, item in value.items()])
    raise _Uncacheable  # generators, symbolic sizes, tensor subclasses, ...


_SKIPPED_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape,
                 torch.Tag.inplace_view)
_CACHEABLE: dict = {}  # operator -> whether it may be replayed
_RECIPES: dict = {}    # (operator, its arguments' key) -> (output leaves, output structure), or None: not replayable


def _cache_key(func, args, kwargs):
    if func not in _CACHEABLE:
        _CACHEABLE[func] = (func.namespace in ("aten", "prims") and not func._schema.is_mutable
                            and not any(tag in func.tags for tag in _SKIPPED_TAGS))
    if not _CACHEABLE[func]:
        return None
    try:
        return func, _key(args), _key(kwargs)
    except _Uncacheable:
        return None


def _exact_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes a dense tensor of this size and stride needs (what ``empty_strided`` allocates)."""
    if tensor.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))) * tensor.element_size()


def _recipe(out, args, inputs: set[int]):
    """How to remake ``out``: each output a fresh tensor, a view of ``args[0]`` or None; None when an output is
    neither (the operator is then always run)."""
    leaves, spec = tree_flatten(out)
    base = args[0] if args and isinstance(args[0], torch.Tensor) else None
    made = []
    for tensor in leaves:
        if tensor is None:  # an output not asked for (a backward's output_mask)
            made.append(None)
        elif type(tensor) is not torch.Tensor or tensor.device.type != "meta":
            return None
        elif base is not None and tensor.untyped_storage()._cdata == base.untyped_storage()._cdata:
            if tensor.dtype != base.dtype:
                return None
            made.append(("view", tensor.shape, tensor.stride(), tensor.storage_offset()))
        elif (not tensor._is_view() and tensor.storage_offset() == 0 and tensor.untyped_storage()._cdata not in inputs
              and tensor.untyped_storage().nbytes() == _exact_bytes(tensor)):
            made.append(("new", tensor.shape, tensor.stride(), tensor.dtype))
        else:
            return None
    if not any(made):
        return None
    return made, (None if isinstance(out, torch.Tensor) else spec)


def _replay(recipe, args):
    """(outputs, the fresh ones among them) from a recipe."""
    made, spec = recipe
    leaves, fresh = [], []
    for leaf in made:
        if leaf is None:
            leaves.append(None)
        elif leaf[0] == "view":
            leaves.append(args[0].as_strided(leaf[1], leaf[2], leaf[3]))
        else:
            tensor = torch.empty_strided(leaf[1], leaf[2], dtype=leaf[3], device="meta")
            leaves.append(tensor)
            fresh.append(tensor)
    return (leaves[0] if spec is None else tree_unflatten(leaves, spec)), fresh


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
