"""Roles on one frozen base (doc §2): PEFT named adapters ``phase_1 .. phase_K`` and ``fake`` on the teacher's
network; the teacher itself is the base with adapters disabled. Memory: one base plus small adapters.

Also the student folder: one LoRA per phase in diffusers format plus ``manifest.json``. For a two-expert
teacher (Wan 2.2 A14B) each phase's LoRA is saved for the transformer(s) its steps run on: one file,
``transformer.``-prefixed as diffusers' ``load_lora_weights`` expects (``load_into_transformer_2=True`` for the
low-noise expert), named in the manifest's ``experts``; a phase that straddles the experts' boundary gets one file
per expert, ``phases[k]`` then mapping expert -> file.
"""
from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import ModelMixin
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pdmd.core.sampling import phase_sigmas
from pdmd.core.schedule import PhaseSchedule
from pdmd.teachers.base import Teacher

FAKE = "fake"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name for LoRA weights
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights records rank and alpha
FOLD_BUDGET_BYTES = 2**30  # merged per-phase weight copies kept for inference (the built-in needs ~20 MB)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}  # refused by name, never opened


class StudentError(ValueError):
    """A student folder that cannot be used; the message names the file and the problem."""


def phase_adapter(phase: int) -> str:
    """Adapter name of 0-based phase ``phase`` (the doc counts phases from 1)."""
    return f"phase_{phase + 1}"


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ()  # empty: the teacher's own (Teacher.lora_target_modules)

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          init_lora_weights=True)  # B = 0: every role starts equal to the teacher


def _first_parameter_dtype(model: ModelMixin) -> torch.dtype:
    """diffusers' ``ModelMixin.dtype`` without its walk over every module (looking for casting hooks)."""
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, param in model.named_parameters():
        if param.is_floating_point() and not any(module in name for module in keep_fp32):
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
                inject_adapter_in_model(lora.peft_config(), teacher.model, adapter_name=name)
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
            self._base_weights = {layer: layer.get_base_layer().weight.data for layer in self.layers}
        merged = self._fold_cache[name] if name is not None else {}
        for layer in self.layers:
            layer.get_base_layer().weight.data = merged.get(layer, self._base_weights[layer])
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
                self._fold_cache[name] = {
                    layer: layer.get_base_layer().weight + layer.get_delta_weight(name)
                    for layer in self.layers if name in layer.lora_A}
            self._switch(None)  # adapters off: each layer runs its (swapped) base weight alone
            self._fold(name)
            return self.teacher.velocity(x, t, cond)
        return velocity

    def parameters_of(self, *names: str) -> list[nn.Parameter]:
        self._fold(None)  # the LoRA wrappers back in the network, where named_parameters finds them
        return [p for n, p in self.teacher.model.named_parameters()
                if any(f".{name}." in n for name in names) and "lora_" in n]

    def reset(self, name: str) -> None:
        """Re-initialise an adapter (the fake score at the start of each phase, doc §4)."""
        self._activate(None)
        self._fold_cache.pop(name, None)  # merged from the old weights
        for layer in self.layers:
            if name in getattr(layer, "lora_A", {}):
                layer.reset_lora_parameters(name, True)

    def state_dict(self, name: str) -> dict[str, Tensor]:
        """One adapter's weights in PEFT key layout (adapter name stripped)."""
        self._fold(None)
        return {k: v.detach().clone() for k, v in
                get_peft_model_state_dict(self.teacher.model, adapter_name=name).items()}

    def load_state_dict(self, name: str, state: dict[str, Tensor]) -> None:
        self._activate(None)
        self._fold_cache.pop(name, None)  # merged from the old weights
        current = get_peft_model_state_dict(self.teacher.model, adapter_name=name)
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


# --- the student folder ---------------------------------------------------------------------------------
def networks_of_phase(teacher: Teacher, schedule: PhaseSchedule, phase: int) -> tuple[str, ...]:
    """The networks of a two-expert teacher that ``phase``'s sampling steps run on, in the teacher's order."""
    if not teacher.network_names:
        return ()
    used = {teacher.network_at(t) for t in phase_sigmas(schedule, phase)[:-1]}
    return tuple(name for name in teacher.network_names if name in used)


def warn_about_shared_phases(teacher: Teacher, schedule: PhaseSchedule) -> None:
    """A two-expert teacher's phase whose steps run on both experts is saved as one LoRA per expert; say so
    before training, since published students (Wan2.2-Lightning) have one expert per phase."""
    for k in range(schedule.num_phases):
        used = networks_of_phase(teacher, schedule, k)
        if len(used) > 1:
            times = ", ".join(f"{t:.3g}" for t in phase_sigmas(schedule, k)[:-1])
            warnings.warn(f"phase {k + 1} has steps at t = {times}, on both experts {' and '.join(used)} (a step "
                          "runs on the expert of the t it starts from): its LoRA is saved for each; for one expert "
                          "per phase, keep each phase's steps on one side of the switch", stacklevel=2)


def save_student(folder: Path, roles: Roles, schedule: PhaseSchedule, manifest: dict, prefix: str | None = None) -> None:
    """phase_k/pytorch_lora_weights.safetensors (diffusers layout: ``<prefix>.<module>.lora_A.weight``, with rank
    and alpha in diffusers' metadata) and manifest.json with the schedule, method and training provenance."""
    teacher = roles.teacher
    prefix = prefix or teacher.lora_prefix
    config = {f"{prefix}.r": roles.lora.rank, f"{prefix}.lora_alpha": roles.lora.alpha,
              f"{prefix}.target_modules": list(roles.lora.target_modules)}

    def write(relative: str, state: dict[str, Tensor], name: str) -> str:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        save_file({f"{prefix}.{key}": value.contiguous().cpu() for key, value in state.items()}, str(folder / relative),
                  metadata={"format": "pt", "pdmd_phase": name, LORA_METADATA_KEY: json.dumps(config)})
        return relative

    phases, experts = [], []
    for k in range(schedule.num_phases):
        name = phase_adapter(k)
        state = roles.state_dict(name)
        if not teacher.network_names:
            phases.append(write(f"{name}/{LORA_WEIGHT_NAME}", state, name))
            continue
        # the adapter lives in every expert; only those the phase runs on were trained (the rest stay B = 0)
        used = networks_of_phase(teacher, schedule, k)
        parts = {e: {key[len(e) + 1:]: v for key, v in state.items() if key.startswith(f"{e}.")} for e in used}
        if len(used) == 1:
            phases.append(write(f"{name}/{LORA_WEIGHT_NAME}", parts[used[0]], name))
            experts.append(used[0])
        else:
            phases.append({e: write(f"{name}/{e}/{LORA_WEIGHT_NAME}", parts[e], name) for e in used})
            experts.append(list(used))
    full = {"version": MANIFEST_VERSION, **manifest, "schedule": schedule.as_dict(), "phases": phases,
            "lora": {"rank": roles.lora.rank, "alpha": roles.lora.alpha,
                     "target_modules": list(roles.lora.target_modules), "prefix": prefix}}
    if teacher.family:
        full["family"] = teacher.family
    if teacher.options():
        full["teacher_options"] = teacher.options()
    if experts:
        full["experts"] = experts
    (folder / MANIFEST).write_text(json.dumps(full, indent=2))


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise StudentError(f"student folder {folder} does not exist")
    if not path.is_file():
        raise StudentError(f"{path} is missing: a student folder needs a manifest.json beside its LoRA files")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise StudentError(f"{path} is not valid JSON ({err})") from None
    for key in ("teacher", "schedule", "phases", "lora"):
        if key not in manifest:
            raise StudentError(f"{path} has no {key!r} entry")
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise StudentError(f"{folder} holds pickle files {pickles}; only .safetensors are loaded")
    return manifest


@dataclass
class Student:
    folder: Path
    manifest: dict
    schedule: PhaseSchedule
    roles: Roles

    @property
    def experts(self):
        """One inference velocity per phase, each run on its merged weights. Used outside ``sample``, they leave
        the last phase's weights in the network: wrap the use in ``roles.active(None)`` if the same network
        serves the plain teacher afterwards."""
        return [self.roles.folded_velocity(phase_adapter(k)) for k in range(self.schedule.num_phases)]

    @property
    def cfg(self) -> float:
        return float(self.manifest.get("cfg", 1.0))

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, callback=None):
        with self.roles.active(None):  # on exit the network holds the base weights again, not a merged phase
            return self.roles.teacher.sample(prompts, seed, self.schedule, self.cfg, self.experts, callback)


def load_student(folder: str | Path, teacher: Teacher | None = None) -> Student:
    """Attach a student's per-phase LoRAs to ``teacher`` (whose network then carries the adapters); without
    one, the teacher the manifest names is loaded (with the resolution it was distilled at)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if teacher is None:
        from pdmd.teachers import load_teacher
        teacher = load_teacher(manifest["teacher"], **manifest.get("teacher_options", {}))
    schedule = PhaseSchedule.from_dict(manifest["schedule"])
    if len(manifest["phases"]) != schedule.num_phases:
        raise StudentError(f"{folder / MANIFEST} lists {len(manifest['phases'])} LoRA files for "
                           f"{schedule.num_phases} phases")
    roles = Roles(teacher, [phase_adapter(k) for k in range(schedule.num_phases)], manifest_lora(manifest))
    load_phases(roles, folder, manifest, range(schedule.num_phases))
    return Student(folder, manifest, schedule, roles)


def manifest_lora(manifest: dict) -> LoraSpec:
    spec = manifest["lora"]
    return LoraSpec(int(spec["rank"]), float(spec["alpha"]), tuple(spec["target_modules"]))


def load_phases(roles: Roles, folder: Path, manifest: dict, phases) -> None:
    """Load the student folder's LoRA of each 0-based phase in ``phases`` into adapter ``phase_k`` of ``roles``."""
    prefix = re.escape(manifest["lora"].get("prefix", "unet")) + r"\."
    all_files = _phase_files(folder, manifest, roles.teacher)
    for k in phases:
        state = {}
        for expert, relative in all_files[k].items():
            module = "" if expert is None else f"{expert}."
            state.update({module + re.sub(f"^{prefix}", "", key): v
                          for key, v in _read_lora(folder, relative, k).items()})
        try:
            roles.load_state_dict(phase_adapter(k), state)
        except StudentError as error:
            raise StudentError(f"{folder}, phase {k + 1} ({', '.join(all_files[k].values())}): {error}") from None


def _phase_files(folder: Path, manifest: dict, teacher: Teacher) -> list[dict[str | None, str]]:
    """Per phase, expert -> file (expert None for a single-network teacher), checked against the teacher."""
    where = folder / MANIFEST
    experts = manifest.get("experts")
    if bool(experts) != bool(teacher.network_names):
        raise StudentError(f"{where}: the student was made for a teacher with "
                           f"{'two experts' if experts else 'one network'} but {teacher.name} has "
                           f"{'experts ' + ', '.join(teacher.network_names) if teacher.network_names else 'one'}")
    if experts is not None and len(experts) != len(manifest["phases"]):
        raise StudentError(f"{where}: 'experts' must name the transformer(s) of each of the "
                           f"{len(manifest['phases'])} phases")
    result = []
    for k, entry in enumerate(manifest["phases"]):
        if not experts:
            result.append({None: entry})
            continue
        files = entry if isinstance(entry, dict) else {experts[k]: entry}
        unknown = [e for e in files if e not in teacher.network_names]
        if unknown:
            raise StudentError(f"{where}: phase {k + 1} names expert(s) {unknown}; {teacher.name} has "
                               f"{', '.join(teacher.network_names)}")
        result.append(files)
    return result


def _read_lora(folder: Path, relative: str, k: int) -> dict[str, Tensor]:
    path = (folder / relative).resolve()
    if folder.resolve() not in path.parents or path.suffix != ".safetensors":
        raise StudentError(f"{folder / MANIFEST}: phase file {relative!r} must be a .safetensors inside the folder")
    if not path.is_file():
        raise StudentError(f"{path} is missing (phase {k + 1} of {folder})")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise StudentError(f"{path} is not a readable safetensors file ({err})") from None
