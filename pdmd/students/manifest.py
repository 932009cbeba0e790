"""A student folder's ``manifest.json`` as one frozen, validated type, read once and passed down.

``Manifest.read(folder)`` checks every field's type and range (NaN and infinity refused) and raises
:class:`StudentError` naming the field, as ``TrainConfig`` does for configs, so a malformed or hostile
manifest never reaches the code that allocates memory or does work. Version 1 manifests (keys ``cfg``,
``experts``, ``steps_trained``, ``steps_per_phase``) still read, with one deprecation line.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

from pdmd import limits
from pdmd.core.schedule import PhaseSchedule, ScheduleError
from pdmd.students import StudentError
from pdmd.teachers.style_loras import DEFAULT_NETWORK, NETWORKS, StyleLora, describe_style

MANIFEST = "manifest.json"
VERSION = 2
PUBLISHED = "published"  # the method of a student made from published LoRA files (pdmd.students.lora_formats)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}  # refused by name, never opened
RENAMED_IN_V2 = {"cfg": "student_cfg", "experts": "networks", "steps_trained": "updates_trained",
                 "steps_per_phase": "updates_per_phase"}
TEACHER_OPTIONS = {"height", "width", "num_frames", "dtype", "offload", "quantize"}
CONDITIONS = ("image",)  # what a student may take beside its prompts (Teacher.conditions)


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ()  # empty: the teacher's own (Teacher.lora_target_modules)
    # lora_B carries a bias (PEFT's lora_bias): only published files with per-module bias deltas make one (the
    # Wan 2.1 I2V Lightx2v LoRAs' ``diff_b``); distillation trains none
    bias: bool = False


@dataclass(frozen=True)
class TeacherLora:
    """A style LoRA fused into the student's teacher (pdmd.teachers.style_loras): its copy inside the student folder,
    the copy's sha256, the strength it was fused at and the network it was fused into."""
    file: str          # relative to the folder
    sha256: str
    strength: float
    network: str = DEFAULT_NETWORK  # manifests written before two-network styles name none: transformer

    def describe(self) -> str:
        return describe_style(Path(self.file).name, self.strength, self.network)


PhaseFiles = str | dict  # one file, or network -> file for a phase that runs on both networks of a teacher


@dataclass(frozen=True)
class Manifest:
    teacher: str
    schedule: PhaseSchedule
    phases: tuple[PhaseFiles, ...]        # per phase, its LoRA file(s), relative to the folder
    lora: LoraSpec
    lora_prefix: str = "unet"             # key prefix in the files (diffusers: "unet" or "transformer")
    method: str = "phased"
    student_cfg: float = 1.0              # guidance when sampling the student (1: distilled in)
    teacher_cfg: float | None = None      # the real score's guidance it was distilled with
    family: str | None = None             # diffusers teacher family (sd3, flux, wan, qwen-image)
    pipeline: str | None = None           # the teacher's diffusers pipeline class (FluxKontextPipeline...)
    teacher_options: dict = field(default_factory=dict)  # load_teacher options: resolution, dtype...
    teacher_loras: tuple[TeacherLora, ...] = ()  # style LoRAs fused into the teacher: base + style is the teacher
    networks: tuple | None = None         # two-network teachers: per phase, the network(s) its LoRA is for
    updates_trained: int | None = None
    updates_per_phase: tuple[int, ...] | None = None
    ema_decay: float | None = None
    seed: int | None = None
    phases_from: dict | None = None       # earlier experts kept from another student (train --from-student)
    published: dict | None = None         # published LoRA files: names, layouts, strengths
    # what the student takes beside its prompts (Teacher.conditions: ("image",) a first frame per prompt), and how
    # many condition images it was distilled on; () for a text-only student, even of an image teacher
    conditions: tuple[str, ...] = ()
    condition_images: int | None = None
    condition_source: str | None = None   # where they came from: "condition_images: <folder>", "drawn by ..."

    # --- reading -----------------------------------------------------------------------------------------
    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        """The manifest of a student folder (which must hold no pickle file)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise StudentError(f"student folder {folder} does not exist")
        if not (folder / MANIFEST).is_file():
            raise StudentError(f"{folder / MANIFEST} is missing: a student folder needs a manifest.json beside its "
                               "LoRA files")
        pickles = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise StudentError(f"{folder} holds pickle files {pickles}; only .safetensors are loaded")
        return cls.read_file(folder / MANIFEST)

    @classmethod
    def read_file(cls, path: Path, name: str | None = None) -> "Manifest":
        """One manifest.json, wherever it is; errors start with ``name`` (default: the path)."""
        name = name or str(path)
        if path.stat().st_size > limits.MAX_MANIFEST_BYTES:
            raise StudentError(f"{name} is larger than {limits.MAX_MANIFEST_BYTES // 1024} KiB: not a manifest")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise StudentError(f"{name} is not valid JSON ({err})") from None
        try:
            return cls.from_dict(data)
        except StudentError as err:
            raise StudentError(f"{name}: {err}") from None

    @classmethod
    def from_dict(cls, data) -> "Manifest":
        if not isinstance(data, dict):
            raise StudentError("a manifest must be a JSON object")
        data = dict(data)
        version = data.pop("version", 1)
        if version not in (1, VERSION):
            raise StudentError(f"version {version!r} is unknown; this pdmd reads versions 1 and {VERSION}")
        if version == 1:
            old = sorted(k for k in RENAMED_IN_V2 if k in data)
            if old:
                warnings.warn(f"manifest version 1 keys {old} read as {[RENAMED_IN_V2[k] for k in old]}; "
                              "saving the student again writes version 2", FutureWarning, stacklevel=3)
            data = {RENAMED_IN_V2.get(k, k): v for k, v in data.items()}
        missing = [k for k in ("teacher", "schedule", "phases", "lora") if k not in data]
        if missing:
            raise StudentError(f"no {missing[0]!r} entry")
        data.pop("task", None)  # written for readers of the file; derived again from the fields (``task``)
        known = set(cls.__dataclass_fields__) - {"lora_prefix"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StudentError(f"unknown key(s) {unknown}")
        lora, prefix = _lora(data.pop("lora"))
        schedule = _schedule(data.pop("schedule"))
        phases = _phases(data.pop("phases"), schedule.num_phases)
        return cls(
            teacher=_text(data.pop("teacher"), "teacher"), schedule=schedule, phases=phases, lora=lora,
            lora_prefix=prefix, method=_text(data.pop("method", "phased"), "method"),
            student_cfg=_cfg(data.pop("student_cfg", 1.0), "student_cfg"),
            teacher_cfg=_optional(data.pop("teacher_cfg", None), _cfg, "teacher_cfg"),
            family=_optional(data.pop("family", None), _text, "family"),
            pipeline=_optional(data.pop("pipeline", None), _text, "pipeline"),
            teacher_options=_teacher_options(data.pop("teacher_options", None) or {}),
            teacher_loras=_teacher_loras(data.pop("teacher_loras", None) or [], "teacher_loras"),
            networks=_optional(data.pop("networks", None), lambda v, n: _networks(v, n, len(phases)), "networks"),
            updates_trained=_optional(data.pop("updates_trained", None), _count, "updates_trained"),
            updates_per_phase=_optional(data.pop("updates_per_phase", None), _counts, "updates_per_phase"),
            ema_decay=_optional(data.pop("ema_decay", None), _decay, "ema_decay"),
            seed=_optional(data.pop("seed", None), _count, "seed"),
            phases_from=_optional(data.pop("phases_from", None), _mapping, "phases_from"),
            published=_optional(data.pop("published", None), _published, "published"),
            conditions=_conditions(data.pop("conditions", None) or [], "conditions"),
            condition_images=_optional(data.pop("condition_images", None),
                                       lambda v, n: _count(v, n, limits.MAX_CONDITION_IMAGES, low=1),
                                       "condition_images"),
            condition_source=_optional(data.pop("condition_source", None), _text, "condition_source"))

    @property
    def task(self) -> str:
        """What the student does: text-to-image or -video, image-to-video (a first frame), or image-to-image (an
        editing teacher's student), from its teacher's options and the conditions it was distilled on."""
        video = "num_frames" in self.teacher_options
        if "image" in self.conditions:
            return "image-to-video" if video else "image-to-image"
        return "text-to-video" if video else "text-to-image"

    # --- writing -----------------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        data = {"version": VERSION, "teacher": self.teacher, "task": self.task, "method": self.method,
                "student_cfg": self.student_cfg,
                "teacher_cfg": self.teacher_cfg, "updates_trained": self.updates_trained,
                "updates_per_phase": list(self.updates_per_phase) if self.updates_per_phase else None,
                "ema_decay": self.ema_decay, "seed": self.seed, "schedule": self.schedule.as_dict(),
                "phases": list(self.phases),
                "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha,
                         "target_modules": list(self.lora.target_modules), "prefix": self.lora_prefix,
                         **({"bias": True} if self.lora.bias else {})},
                "family": self.family, "pipeline": self.pipeline, "teacher_options": self.teacher_options or None,
                "teacher_loras": [{"file": lora.file, "sha256": lora.sha256, "strength": lora.strength,
                                   "network": lora.network} for lora in self.teacher_loras] or None,
                "networks": list(self.networks) if self.networks else None, "phases_from": self.phases_from,
                "published": self.published, "conditions": list(self.conditions) or None,
                "condition_images": self.condition_images, "condition_source": self.condition_source}
        return {k: v for k, v in data.items() if v is not None}

    def write(self, folder: Path) -> None:
        (Path(folder) / MANIFEST).write_text(json.dumps(self.as_dict(), indent=2))

    def teacher_load_options(self, folder: str | Path) -> dict:
        """load_teacher's options for this student's teacher: the recorded ones plus its style LoRAs, read from
        their copies in ``folder`` (load_teacher checks each copy's sha256)."""
        if not self.teacher_loras:
            return dict(self.teacher_options)
        return {**self.teacher_options, "teacher_loras": tuple(
            StyleLora(Path(folder) / lora.file, lora.strength, lora.sha256, lora.network)
            for lora in self.teacher_loras)}

    @property
    def is_published(self) -> bool:
        return self.method == PUBLISHED

    def phase_files(self, k: int) -> dict[str | None, str]:
        """Phase ``k``'s LoRA files, network -> relative path (network None for a one-network teacher)."""
        entry = self.phases[k]
        if isinstance(entry, dict):
            return dict(entry)
        return {(self.networks[k] if self.networks else None): entry}


# --- field checks: each returns the clean value or raises StudentError naming the field ----------------------
def _text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limits.MAX_NAME_CHARS:
        raise StudentError(f"{name} = {str(value)[:80]!r} must be a non-empty string of at most "
                           f"{limits.MAX_NAME_CHARS} characters")
    return value


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise StudentError(f"{name} = {value!r} must be a finite number")
    if not low <= value <= high:
        raise StudentError(f"{name} = {value!r} must lie between {low:g} and {high:g}")
    return float(value)


def _count(value, name: str, high: int = 2**53, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StudentError(f"{name} = {str(value)[:40]} must be a whole number from {low} to {high}")
    return value


def _counts(value, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limits.MAX_PHASES:
        raise StudentError(f"{name} = {str(value)[:80]} must be a list of whole numbers, one per phase")
    return tuple(_count(v, f"{name}[{k}]") for k, v in enumerate(value))


def _cfg(value, name: str) -> float:
    return _number(value, name, 0.0, limits.MAX_CFG)


def _decay(value, name: str) -> float:
    decay = _number(value, name, 0.0, 1.0)
    if decay == 1.0:
        raise StudentError(f"{name} = 1 would never move: it must be below 1")
    return decay


def _optional(value, check, name: str):
    return None if value is None else check(value, name)


def _mapping(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise StudentError(f"{name} must be a JSON object")
    return value


def _schedule(value) -> PhaseSchedule:
    try:
        schedule = PhaseSchedule.from_dict(value)
    except ScheduleError as err:
        raise StudentError(f"schedule: {err}") from None
    if schedule.num_phases > limits.MAX_PHASES or schedule.nfe > limits.MAX_STUDENT_STEPS:
        raise StudentError(f"schedule has {schedule.num_phases} phases and {schedule.nfe} steps; a few-step "
                           f"student has at most {limits.MAX_PHASES} phases and {limits.MAX_STUDENT_STEPS} steps")
    return schedule


def _lora(value) -> tuple[LoraSpec, str]:
    if not isinstance(value, dict):
        raise StudentError(f"lora = {str(value)[:80]} must be an object with rank, alpha and target_modules")
    unknown = sorted(set(value) - {"rank", "alpha", "target_modules", "prefix", "bias"})
    if unknown:
        raise StudentError(f"lora has unknown key(s) {unknown}")
    rank = value.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limits.MAX_LORA_RANK:
        raise StudentError(f"lora.rank = {str(rank)[:40]!r} must be a whole number from 1 to {limits.MAX_LORA_RANK}")
    alpha = _number(value.get("alpha"), "lora.alpha", 1e-6, 1e6)
    modules = value.get("target_modules")
    if (not isinstance(modules, list) or not modules or len(modules) > limits.MAX_TARGET_MODULES
            or not all(isinstance(m, str) and 0 < len(m) <= limits.MAX_NAME_CHARS for m in modules)):
        raise StudentError(f"lora.target_modules must be a non-empty list of at most {limits.MAX_TARGET_MODULES} "
                           "module names")
    prefix = _text(value.get("prefix", "unet"), "lora.prefix")
    bias = value.get("bias", False)
    if not isinstance(bias, bool):
        raise StudentError(f"lora.bias = {str(bias)[:40]!r} must be true or false")
    return LoraSpec(rank, alpha, tuple(modules), bias), prefix


def _relative_file(value, name: str) -> str:
    if (not isinstance(value, str) or not value.endswith(".safetensors") or value.startswith(("/", "\\"))
            or ".." in Path(value).parts or len(value) > limits.MAX_NAME_CHARS):
        raise StudentError(f"{name} = {str(value)[:80]!r} must be a .safetensors path inside the folder")
    return value


def _phases(value, count: int) -> tuple[PhaseFiles, ...]:
    if not isinstance(value, list) or len(value) != count:
        raise StudentError(f"phases must list one LoRA file per phase of the schedule ({count})")
    phases = []
    for k, entry in enumerate(value):
        if isinstance(entry, dict):
            if not entry or len(entry) > limits.MAX_PHASES:
                raise StudentError(f"phases[{k}] must map each network to its file")
            phases.append({_text(n, f"phases[{k}] network"): _relative_file(f, f"phases[{k}][{n!r}]")
                           for n, f in entry.items()})
        else:
            phases.append(_relative_file(entry, f"phases[{k}]"))
    return tuple(phases)


def _networks(value, name: str, count: int) -> tuple:
    if not isinstance(value, list) or len(value) != count:
        raise StudentError(f"{name} must name the network(s) of each of the {count} phases")
    out = []
    for k, entry in enumerate(value):
        if isinstance(entry, list):
            out.append(tuple(_text(n, f"{name}[{k}]") for n in entry))
        else:
            out.append(_text(entry, f"{name}[{k}]"))
    return tuple(out)


def _teacher_options(value) -> dict:
    if not isinstance(value, dict) or set(value) - TEACHER_OPTIONS:
        raise StudentError(f"teacher_options must be an object with keys among {sorted(TEACHER_OPTIONS)}")
    options = {}
    for key, option in value.items():
        if key in ("height", "width"):
            options[key] = _count(option, f"teacher_options.{key}", limits.MAX_SIDE, low=1)
        elif key == "num_frames":
            options[key] = _count(option, f"teacher_options.{key}", limits.MAX_FRAMES, low=1)
        elif key == "offload":
            if not isinstance(option, bool):
                raise StudentError("teacher_options.offload must be true or false")
            options[key] = option
        else:
            options[key] = _text(option, f"teacher_options.{key}")
    return options


def _teacher_loras(value, name: str) -> tuple[TeacherLora, ...]:
    if not isinstance(value, list) or len(value) > limits.MAX_TEACHER_LORAS:
        raise StudentError(f"{name} must be a list of at most {limits.MAX_TEACHER_LORAS} {{file, sha256, strength, "
                           "network} entries")
    loras = []
    for k, entry in enumerate(value):
        where = f"{name}[{k}]"
        if not isinstance(entry, dict) or not {"file", "sha256", "strength"} <= set(entry) <= \
                {"file", "sha256", "strength", "network"}:
            raise StudentError(f"{where} must be an object with file, sha256, strength and optionally network")
        if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise StudentError(f"{where}.sha256 must be 64 lower-case hexadecimal digits")
        network = entry.get("network", DEFAULT_NETWORK)
        if network not in NETWORKS:
            raise StudentError(f"{where}.network = {str(network)[:40]!r} must be {' or '.join(NETWORKS)}")
        loras.append(TeacherLora(_relative_file(entry["file"], f"{where}.file"), entry["sha256"],
                                 _number(entry["strength"], f"{where}.strength", 0.0, limits.MAX_STRENGTH), network))
    return tuple(loras)


def _conditions(value, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(c in CONDITIONS for c in value) or len(set(value)) != len(value):
        raise StudentError(f"{name} = {str(value)[:80]} must list distinct conditions among {list(CONDITIONS)}")
    return tuple(value)


def _published(value, name: str) -> dict:
    value = _mapping(value, name)
    strengths = value.get("strengths", [])
    if not isinstance(strengths, list):
        raise StudentError(f"{name}.strengths must be a list of numbers")
    for k, strength in enumerate(strengths):
        _number(strength, f"{name}.strengths[{k}]", 0.0, limits.MAX_STRENGTH)
    files = value.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise StudentError(f"{name}.files must be a list of file names")
    return value
