"""Style LoRAs fused into a teacher ("distil my model"): a diffusers base plus the style LoRA(s) someone trained on
it, distilled as one teacher.

``load_teacher(..., teacher_loras=...)`` fuses each file into the frozen base right after the pipeline loads and
before any quantization (a quantized base loads unquantized, is fused, then quantized), so the real score, the
fake score's initialisation and every phase expert stand on base + style: to the method it is just another
teacher (docs/method.md §2). diffusers does the loading and fusing (``load_lora_weights``, ``set_adapters`` at the
strengths, ``fuse_lora``, ``unload_lora_weights``). Before it runs, every file is checked as ``pdmd lora import``
checks a published file (pdmd.students.lora_formats: keys that match no module, shapes that do not fit, DoRA,
parts for other components), since diffusers would skip a misfit with a log line. Those checks are the one thing
this layer takes from pdmd/students (imported where used).

A ``StyleLora`` is known by its content (sha256) and strength, not by its path: teachers are kept by their load
options (pdmd.teachers.teacher_key), so base and base + style are two teachers, while a student's copy of the
file is the same teacher as the file it was copied from.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

from pdmd import limits
from pdmd.teachers.base import TeacherError

ADAPTER_PREFIX = "style"  # the style LoRAs' diffusers adapter names (style_1, ...), fusing and in model cards


@dataclass(frozen=True)
class StyleLora:
    """One style LoRA file at a strength (0 = the base, 1 = as trained, up to MAX_STRENGTH)."""
    file: Path = field(compare=False)  # where it is read from; equality and the teacher key go by content
    strength: float
    sha256: str

    @property
    def name(self) -> str:
        return self.file.name

    def describe(self) -> str:
        return f"{self.name} × {self.strength:g}"


def same_styles(ours, theirs) -> bool:
    """Whether two lists of style LoRAs -- StyleLoras, or a manifest's records of them -- make the same teacher:
    the same contents at the same strengths, in the same order."""
    return [(lora.sha256, lora.strength) for lora in ours] == [(lora.sha256, lora.strength) for lora in theirs]


def describe_styles(loras) -> str:
    return ", ".join(lora.describe() for lora in loras) or "none"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:  # in chunks: a style LoRA of a 12B network can be a gigabyte
        for chunk in iter(lambda: handle.read(2**24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def style_lora(file, strength=1.0, relative_to: Path | None = None, where: str = "style LoRA") -> StyleLora:
    """``file`` at ``strength``, checked without a model: a readable .safetensors file of LoRA weights and a
    strength in [0, MAX_STRENGTH]; TeacherError with one line naming ``where`` otherwise. A relative path is
    taken relative to ``relative_to`` (default: the working directory)."""
    from pdmd.students.manifest import PICKLE_SUFFIXES
    if isinstance(strength, bool) or not isinstance(strength, Real) or not math.isfinite(strength) \
            or not 0 <= strength <= limits.MAX_STRENGTH:
        raise TeacherError(f"{where} strength {strength!r} must be a number in [0, {limits.MAX_STRENGTH:g}]")
    if not isinstance(file, (str, Path)) or not str(file).strip() or len(str(file)) > limits.MAX_NAME_CHARS:
        raise TeacherError(f"{where} file {str(file)[:80]!r} must be the path of a .safetensors LoRA file")
    path = Path(str(file).strip()).expanduser()
    path = (path if path.is_absolute() or relative_to is None else Path(relative_to) / path).resolve()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TeacherError(f"{where} {path.name} refused: pickle files are never loaded; use .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise TeacherError(f"{where} {path.name} is not a .safetensors file")
    if not path.is_file():
        raise TeacherError(f"{where} {file} does not exist")
    _check_holds_lora(path, where)
    return StyleLora(path, float(strength), sha256_of(path))


def _check_holds_lora(path: Path, where: str) -> None:
    """A readable safetensors file whose keys are LoRA weights: its header only, no tensor is read."""
    from safetensors import safe_open

    from pdmd.students.lora_formats import LoraFormatError, detect_layout
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise TeacherError(f"{where} {path.name} is not a readable safetensors file ({err})") from None
    try:
        detect_layout(dict.fromkeys(keys))
    except LoraFormatError as err:
        raise TeacherError(f"{where} {path.name}: {err}") from None


def parse_teacher_loras(value, relative_to: Path | None = None, where: str = "teacher_loras") -> tuple[StyleLora, ...]:
    """A config's or showcase's ``teacher_loras`` -- a list of ``{file, strength}`` (strength default 1) -- as
    checked StyleLoras; StyleLoras pass as they are. TeacherError naming the entry otherwise."""
    if value is None:
        return ()
    if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
        raise TeacherError(f"{where} must be a list of {{file, strength}} entries")
    if len(value) > limits.MAX_TEACHER_LORAS:
        raise TeacherError(f"{where} lists {len(value)} LoRAs; at most {limits.MAX_TEACHER_LORAS}")
    loras = []
    for k, entry in enumerate(value):
        if isinstance(entry, StyleLora):
            loras.append(entry)
            continue
        if not isinstance(entry, dict) or "file" not in entry or set(entry) - {"file", "strength"}:
            raise TeacherError(f"{where}[{k}] must be a mapping with 'file' and optionally 'strength'")
        loras.append(style_lora(entry["file"], entry.get("strength", 1.0), relative_to, f"{where}[{k}]"))
    return tuple(loras)


def check_takes_style_loras(model_index: dict, quantize: str) -> None:
    """Refuse, in one line and before the pipeline loads, a teacher no style LoRA can be fused into."""
    if quantize == "nf4":  # bitsandbytes quantizes while loading only, so it cannot follow the fuse
        raise TeacherError("teacher_loras cannot be fused into an nf4 base (bitsandbytes quantizes only while "
                           "loading); use quantize int8 or fp8, which quantize after the fuse")
    second = model_index.get("transformer_2")
    if isinstance(second, list) and second and second[0] is not None:  # an absent component is [null, null]
        raise TeacherError("teacher_loras are for one-network teachers; a two-network teacher (Wan 2.2 A14B) "
                           "would need a style LoRA per network")


def fuse_style_loras(pipe, family: str, loras: tuple[StyleLora, ...], quantize: str = "none") -> None:
    """Check ``loras`` against ``pipe``'s transformer, fuse them into it at their strengths, then quantize it in
    ``quantize`` ("int8" / "fp8"; the pipeline was loaded unquantized for this). TeacherError, one line, for a
    file that is missing, changed since it was named, or does not fit."""
    from pdmd.students.lora_formats import LoraFormatError, load_published
    from pdmd.teachers.quantize import quantize_module

    for lora in loras:
        if not lora.file.is_file():
            raise TeacherError(f"style LoRA {lora.file} is missing")
        if sha256_of(lora.file) != lora.sha256:
            raise TeacherError(f"style LoRA {lora.file} has changed: its sha256 is not the recorded "
                               f"{lora.sha256[:12]}…")
        try:
            load_published(lora.file, family, pipe.transformer)  # the checks of `pdmd lora import`
        except LoraFormatError as err:
            raise TeacherError(f"style LoRA {lora.name} does not fit this {family} teacher (a LoRA of another "
                               f"model?): {err}") from None
    names = [f"{ADAPTER_PREFIX}_{k + 1}" for k in range(len(loras))]
    for name, lora in zip(names, loras):
        pipe.load_lora_weights(str(lora.file), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[lora.strength for lora in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # the PEFT layers go, the fused weights stay: a plain base for the phase experts
    if quantize != "none":
        quantize_module(pipe.transformer, quantize)
