"""Roles on one frozen base (docs/method.md §2): PEFT named adapters ``phase_1 .. phase_K`` and ``fake`` on the
teacher's network; the teacher itself is the base with adapters disabled. Memory: one base plus small adapters.

The roles also keep their own training state: every adapter's tensors, the experts' EMA, and the swap that puts
the EMA weights in for an export (the trainer only drives them). Adapters and EMA are float32 whatever the base's
dtype: on a bf16 base a bf16 LoRA weight loses AdamW steps of ~1e-4 to rounding (8 bits of mantissa).
"""
from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from dataclasses import replace

import torch
from diffusers import ModelMixin
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from torch import Tensor, nn

from pdmd.students import StudentError
from pdmd.students.manifest import LoraSpec
from pdmd.teachers.base import Teacher

FAKE = "fake"
FOLD_BUDGET_BYTES = 2**30  # merged per-phase weight copies kept for inference (the built-in needs ~20 MB)


def phase_adapter(phase: int) -> str:
    """Adapter name of 0-based phase ``phase`` (the doc counts phases from 1)."""
    return f"phase_{phase + 1}"


def peft_config(lora: LoraSpec) -> LoraConfig:
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                      init_lora_weights=True,  # B = 0 (and its bias): every role starts equal to the teacher
                      lora_bias=lora.bias)


def _first_parameter_dtype(model: ModelMixin) -> torch.dtype:
    """diffusers' ``ModelMixin.dtype`` without its walk over every module (looking for casting hooks); the base's
    dtype, never that of the (float32) LoRA weights."""
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, param in model.named_parameters():
        if param.is_floating_point() and "lora_" not in name and not any(module in name for module in keep_fp32):
            return param.dtype
    return ModelMixin.dtype.fget(model)


def _skip_dtype_walk(network: nn.Module) -> None:
    """``ModelMixin.dtype`` walks every module on each call, and a UNet2DModel asks twice per forward: with the
    LoRA wrappers that is ~15% of a training step of the built-in teacher. No casting hooks are attached here
    (checked), so each diffusers model gets a same-named subclass whose ``dtype`` reads the first parameter."""
    if any(hasattr(module, "_diffusers_hook") for module in network.modules()):
        return
    for module in network.modules():
        cls = type(module)
        if isinstance(module, ModelMixin) and cls.dtype is ModelMixin.dtype:
            module.__class__ = type(cls.__name__, (cls,), {"dtype": property(_first_parameter_dtype),
                                                          "__module__": cls.__module__})


def _adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """PEFT's state dict of adapter ``name``; its warning that a 1-D lora_B tensor is an ungathered shard is
    wrong for a lora_bias, which is 1-D."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        return get_peft_model_state_dict(model, adapter_name=name)


def _weights(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    return layer.weight.data, (layer.bias.data if getattr(layer, "bias", None) is not None else None)


def _merged(wrapper: BaseTunerLayer, name: str) -> tuple[Tensor, Tensor | None]:
    """Adapter ``name`` merged into its layer: the weight (and, with lora_bias, the bias), in float32, stored in
    the base's dtype."""
    base = wrapper.get_base_layer()
    weight = (base.weight + wrapper.get_delta_weight(name)).to(base.weight.dtype)
    lora_bias = wrapper.lora_B[name].bias
    if lora_bias is None or base.bias is None:
        return weight, None
    return weight, (base.bias + lora_bias * wrapper.scaling[name]).to(base.bias.dtype)


class Roles:
    """Teacher, phase experts and fake score as named adapters on ``teacher.model``.

    ``velocity(name)`` returns a callable v(x, t, cond) for a role (None = the teacher). Switching roles only
    changes which adapter is active: PEFT's own ``set_adapter`` also flips ``requires_grad``, which would
    silently drop the gradient of a graph built before the switch, so trainability is managed separately.
    """

    def __init__(self, teacher: Teacher, adapters: list[str], lora: LoraSpec):
        if not lora.target_modules:
            lora = replace(lora, target_modules=tuple(teacher.lora_target_modules))
        self.teacher, self.lora = teacher, lora
        teacher.model.requires_grad_(False)
        _skip_dtype_walk(teacher.model)
        with warnings.catch_warnings():  # several adapters on one model is the point here, not a mistake
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in adapters:
                try:
                    inject_adapter_in_model(peft_config(lora), teacher.model, adapter_name=name)
                except ValueError as err:  # peft: NoMatchingPeftModuleError for names no layer has
                    raise StudentError(f"LoRA target modules {list(lora.target_modules)} match no layer of "
                                       f"{type(teacher.model).__name__} ({err})") from None
                # PEFT gives a new adapter its base layer's dtype; get_peft_model would upcast it, injection does not
                cast_adapter_dtype(teacher.model, adapter_name=name)
        # where each LoRA wrapper sits, so folded inference can take it out of the network and put it back
        self._slots = [(teacher.model.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], module)
                       for path, module in teacher.model.named_modules() if isinstance(module, BaseTunerLayer)]
        self.layers = [wrapper for _, _, wrapper in self._slots]
        if not self.layers:
            raise StudentError(f"LoRA target modules {list(lora.target_modules)} match no layer of "
                               f"{type(teacher.model).__name__}")
        self.adapters = list(adapters)
        self._base_weights: dict[nn.Module, Tensor] = {}
        self._fold_cache: dict[str, dict[nn.Module, Tensor]] = {}  # adapter -> merged weight per layer
        self._folded: str | None = None
        self.ema: dict[str, dict[str, Tensor]] = {}  # adapter -> its exponential moving average
        for param in self.parameters_of(*adapters):
            param.requires_grad_(False)
        self._activate(None)

    def _activate(self, name: str | None) -> None:
        self._fold(None)
        self._switch(name)

    def _switch(self, name: str | None) -> None:
        for layer in self.layers:
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]

    @contextmanager
    def active(self, name: str | None):
        self._activate(name)
        try:
            yield
        finally:
            self._activate(None)

    def velocity(self, name: str | None):
        def velocity(x: Tensor, t: Tensor, cond) -> Tensor:
            with self.active(name):
                return self.teacher.velocity(x, t, cond)
        return velocity

    def _fold(self, name: str | None) -> None:
        """Swap in adapter ``name``'s merged weights (None: the base's own) and take the LoRA wrappers out of the
        network (None: put them back), so that inference runs the plain network: at a small batch, PEFT's extra
        matmuls and dispatch cost as much as the base layers, and diffusers' ``dtype`` lookup walks every module
        twice per call. Swapping tensors (rather than merging and unmerging) is free per call and leaves the base
        weights bit-exact."""
        if self._folded == name:
            return
        if self._folded is None:  # the base weights as they are now (the model may have moved since __init__)
            self._base_weights = {layer: _weights(layer.get_base_layer()) for layer in self.layers}
        merged = self._fold_cache[name] if name is not None else {}
        for layer in self.layers:
            base = layer.get_base_layer()
            _, base_bias = self._base_weights[layer]
            base.weight.data, bias = merged.get(layer, self._base_weights[layer])
            if base_bias is not None:  # a merged bias only where the adapter has one (lora_bias)
                base.bias.data = base_bias if bias is None else bias
        for parent, attribute, wrapper in self._slots:
            setattr(parent, attribute, wrapper.get_base_layer() if name is not None else wrapper)
        self._folded = name

    def folded_velocity(self, name: str):
        """Inference-only v(x, t, cond) of adapter ``name`` with its LoRA merged into a cached copy of the
        weights it touches; it falls back to the adapter path when K copies would not fit FOLD_BUDGET_BYTES."""
        cached = sum(layer.get_base_layer().weight.nbytes for layer in self.layers)
        quantized = any(type(layer.get_base_layer().weight) not in (Tensor, nn.Parameter) for layer in self.layers)
        if quantized or (name not in self._fold_cache and cached * (len(self._fold_cache) + 1) > FOLD_BUDGET_BYTES):
            return self.velocity(name)  # a quantized base cannot hold merged float weights

        @torch.no_grad()
        def velocity(x: Tensor, t: Tensor, cond) -> Tensor:
            if name not in self._fold_cache:
                self._activate(None)
                self._fold_cache[name] = {layer: _merged(layer, name) for layer in self.layers if name in layer.lora_A}
            self._switch(None)  # adapters off: each layer runs its (swapped) base weight alone
            self._fold(name)
            return self.teacher.velocity(x, t, cond)
        return velocity

    def check_same_lora(self, lora: LoraSpec, source: str) -> None:
        """Refuse weights (``source``'s) of a LoRA with another rank, alpha or target modules than these adapters."""
        if (lora.rank, lora.alpha, set(lora.target_modules)) != (
                self.lora.rank, self.lora.alpha, set(self.lora.target_modules)):
            raise StudentError(f"{source}: its LoRA (rank {lora.rank}, alpha {lora.alpha:g}) differs from this "
                               f"config's (rank {self.lora.rank}, alpha {self.lora.alpha:g})")

    def parameters_of(self, *names: str) -> list[nn.Parameter]:
        self._fold(None)  # the LoRA wrappers back in the network, where named_parameters finds them
        return [p for n, p in self.teacher.model.named_parameters()
                if any(f".{name}." in n for name in names) and "lora_" in n]

    def reset(self, name: str) -> None:
        """Re-initialise an adapter (the fake score at the start of each phase, docs/method.md §4)."""
        self._activate(None)
        self._fold_cache.pop(name, None)  # merged from the old weights
        for layer in self.layers:
            if name in getattr(layer, "lora_A", {}):
                layer.reset_lora_parameters(name, True)

    def state_dict(self, name: str) -> dict[str, Tensor]:
        """One adapter's weights in PEFT key layout (adapter name stripped)."""
        self._fold(None)
        return {k: v.detach().clone() for k, v in
                _adapter_state(self.teacher.model, name).items()}

    def load_state_dict(self, name: str, state: dict[str, Tensor]) -> None:
        self._activate(None)
        self._fold_cache.pop(name, None)  # merged from the old weights
        current = _adapter_state(self.teacher.model, name)
        misfits = [k for k, v in state.items() if k in current and current[k].shape != v.shape]
        if misfits:  # torch would list every one; the likely cause is a student of another network
            key = misfits[0]
            raise StudentError(f"{len(misfits)} of {len(state)} LoRA weights do not fit the teacher's layers "
                               f"(e.g. {key}: {tuple(state[key].shape)} in the file, {tuple(current[key].shape)} "
                               f"in the teacher): it was made for another network, such as an earlier version "
                               f"of this teacher; distil it again from this one")
        result = set_peft_model_state_dict(self.teacher.model, state, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise StudentError(f"LoRA keys match no module of the teacher: {unexpected[:8]}"
                               + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))

    # --- training state: what a checkpoint holds of the roles ----------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Every adapter's weights and the EMA, under ``adapter/<name>/...`` and ``ema/<name>/...``."""
        tensors = {}
        for name in self.adapters:
            tensors.update({f"adapter/{name}/{k}": v for k, v in self.state_dict(name).items()})
        for name, state in self.ema.items():
            tensors.update({f"ema/{name}/{k}": v for k, v in state.items()})
        return tensors

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """The inverse of ``tensors`` (other keys, e.g. an optimizer's, are ignored). A checkpoint loads on the CPU:
        the adapters are copied into their parameters, and each EMA tensor goes to its weight's device and dtype."""
        for name in self.adapters:
            self.load_state_dict(name, _under(tensors, f"adapter/{name}/"))
        self.ema = {}
        for name in self.adapters:
            if state := _under(tensors, f"ema/{name}/"):
                weights = _adapter_state(self.teacher.model, name)
                self.ema[name] = {k: v.to(weights[k].device, weights[k].dtype) for k, v in state.items()}

    def update_ema(self, name: str, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights, for adapter ``name`` (starting from its weights)."""
        current = self.state_dict(name)
        previous = self.ema.get(name, current)
        self.ema[name] = {k: decay * previous[k] + (1 - decay) * v for k, v in current.items()}

    def adopt_ema(self, name: str) -> None:
        """Adapter ``name`` takes its EMA weights for good: a finished phase's expert, so that later phases train
        on the states the exported student will produce."""
        if name in self.ema:
            self.load_state_dict(name, self.ema[name])

    @contextmanager
    def ema_weights(self):
        """The EMA weights in place of the trained ones (for an export), the trained ones back on exit."""
        live = {name: self.state_dict(name) for name in self.ema}
        for name, state in self.ema.items():
            self.load_state_dict(name, state)
        try:
            yield
        finally:
            for name, state in live.items():
                self.load_state_dict(name, state)

    def fingerprint(self) -> str:
        """SHA-256 of every adapter's weights: equal on every rank of a run, and across an interrupted run on the
        CPU (CUDA's default kernels are not deterministic: there a resumed run agrees within float tolerance)."""
        digest = hashlib.sha256()
        for name in self.adapters:
            for key, value in sorted(self.state_dict(name).items()):
                digest.update(key.encode())
                digest.update(value.float().cpu().numpy().tobytes())
        return digest.hexdigest()


def _under(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
