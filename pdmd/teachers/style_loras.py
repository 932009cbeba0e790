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

A two-network teacher (Wan 2.2 A14B) takes a style LoRA per network, as such styles are published: the high-noise
file for ``transformer``, the low-noise one for ``transformer_2`` (``network``; diffusers loads it there with
``load_into_transformer_2=True``). Each file is checked against, and fused into, its own network only.

A ``StyleLora`` is known by its content (sha256), strength and network, not by its path: teachers are kept by
their load options (pdmd.teachers.teacher_key), so base and base + style are two teachers, while a student's copy
of the file is the same teacher as the file it was copied from.
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
# the diffusers components a style LoRA can go into: every teacher's transformer, and Wan 2.2 A14B's second
# (low-noise) network
DEFAULT_NETWORK, SECOND_NETWORK = NETWORKS = ("transformer", "transformer_2")


def describe_style(name: str, strength: float, network: str) -> str:
    """'name × strength', and the network where it is not the default one."""
    return f"{name} × {strength:g}" + (f" on {network}" if network != DEFAULT_NETWORK else "")


@dataclass(frozen=True)
class StyleLora:
    """One style LoRA file at a strength (0 = the base, 1 = as trained, up to MAX_STRENGTH), for one network of
    the teacher."""
    file: Path = field(compare=False)  # where it is read from; equality and the teacher key go by content
    strength: float
    sha256: str
    network: str = DEFAULT_NETWORK

    @property
    def name(self) -> str:
        return self.file.name

    def describe(self) -> str:
        return describe_style(self.name, self.strength, self.network)

    def as_entry(self) -> dict:
        """The ``{file, strength, network}`` entry a config or showcase lists it as (parse_teacher_loras)."""
        return {"file": str(self.file), "strength": self.strength, "network": self.network}


def same_styles(ours, theirs) -> bool:
    """Whether two lists of style LoRAs -- StyleLoras, or a manifest's records of them -- make the same teacher:
    the same contents at the same strengths on the same networks, in the same order."""
    def identity(loras):
        return [(lora.sha256, lora.strength, lora.network) for lora in loras]
    return identity(ours) == identity(theirs)


def describe_styles(loras) -> str:
    return ", ".join(lora.describe() for lora in loras) or "none"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:  # in chunks: a style LoRA of a 12B network can be a gigabyte
        for chunk in iter(lambda: handle.read(2**24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def style_lora(file, strength=1.0, relative_to: Path | None = None, where: str = "style LoRA",
               network: str = DEFAULT_NETWORK) -> StyleLora:
    """``file`` at ``strength`` for ``network``, checked without a model: a readable .safetensors file of LoRA
    weights, a strength in [0, MAX_STRENGTH] and a network in NETWORKS; TeacherError with one line naming ``where``
    otherwise. A relative path is taken relative to ``relative_to`` (default: the working directory)."""
    from pdmd.students.manifest import PICKLE_SUFFIXES
    if isinstance(strength, bool) or not isinstance(strength, Real) or not math.isfinite(strength) \
            or not 0 <= strength <= limits.MAX_STRENGTH:
        raise TeacherError(f"{where} strength {strength!r} must be a number in [0, {limits.MAX_STRENGTH:g}]")
    if network not in NETWORKS:
        raise TeacherError(f"{where} network {str(network)[:40]!r} must be {' or '.join(NETWORKS)} (Wan 2.2 A14B's "
                           "high-noise and low-noise networks; one-network teachers have transformer only)")
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
    return StyleLora(path, float(strength), sha256_of(path), network)


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
    """A config's or showcase's ``teacher_loras`` -- a list of ``{file, strength, network}`` (strength default 1,
    network default transformer) -- as checked StyleLoras; StyleLoras pass as they are. TeacherError naming the
    entry otherwise."""
    if value is None:
        return ()
    if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
        raise TeacherError(f"{where} must be a list of {{file, strength, network}} entries")
    if len(value) > limits.MAX_TEACHER_LORAS:
        raise TeacherError(f"{where} lists {len(value)} LoRAs; at most {limits.MAX_TEACHER_LORAS}")
    loras = []
    for k, entry in enumerate(value):
        if isinstance(entry, StyleLora):
            loras.append(entry)
            continue
        if not isinstance(entry, dict) or "file" not in entry or set(entry) - {"file", "strength", "network"}:
            raise TeacherError(f"{where}[{k}] must be a mapping with 'file' and optionally 'strength' and 'network'")
        loras.append(style_lora(entry["file"], entry.get("strength", 1.0), relative_to, f"{where}[{k}]",
                                entry.get("network", DEFAULT_NETWORK)))
    return tuple(loras)


def check_takes_style_loras(model_index: dict, quantize: str, loras: tuple[StyleLora, ...]) -> None:
    """Refuse, in one line and before the pipeline loads, a teacher ``loras`` cannot be fused into: an nf4 base,
    or a style LoRA for a second network the teacher does not have."""
    if quantize == "nf4":  # bitsandbytes quantizes while loading only, so it cannot follow the fuse
        raise TeacherError("teacher_loras cannot be fused into an nf4 base (bitsandbytes quantizes only while "
                           "loading); use quantize int8 or fp8, which quantize after the fuse")
    second = model_index.get(SECOND_NETWORK)
    has_second = isinstance(second, list) and bool(second) and second[0] is not None  # absent: [null, null]
    for lora in loras:
        if lora.network == SECOND_NETWORK and not has_second:
            raise TeacherError(f"style LoRA {lora.name} is for network {SECOND_NETWORK}, which this one-network "
                               f"teacher does not have ({SECOND_NETWORK} is Wan 2.2 A14B's low-noise network); give "
                               f"it network {DEFAULT_NETWORK}")


def fuse_style_loras(pipe, family: str, loras: tuple[StyleLora, ...], quantize: str = "none") -> None:
    """Check each of ``loras`` against its network of ``pipe``, fuse it into that network at its strength, then
    quantize the pipeline's network(s) in ``quantize`` ("int8" / "fp8"; the pipeline was loaded unquantized for
    this). TeacherError, one line, for a file that is missing, changed since it was named, or does not fit."""
    from pdmd.students.lora_formats import LoraFormatError, load_published
    from pdmd.teachers.quantize import quantize_module

    two_networks = getattr(pipe, SECOND_NETWORK, None) is not None
    for lora in loras:
        if not lora.file.is_file():
            raise TeacherError(f"style LoRA {lora.file} is missing")
        if sha256_of(lora.file) != lora.sha256:
            raise TeacherError(f"style LoRA {lora.file} has changed: its sha256 is not the recorded "
                               f"{lora.sha256[:12]}…")
        target = f"this {family} teacher's {lora.network}" if two_networks else f"this {family} teacher"
        try:
            load_published(lora.file, family, getattr(pipe, lora.network))  # the checks of `pdmd lora import`
        except LoraFormatError as err:
            raise TeacherError(f"style LoRA {lora.name} does not fit {target} (a LoRA of another model?): "
                               f"{err}") from None
    names = [f"{ADAPTER_PREFIX}_{k + 1}" for k in range(len(loras))]
    for name, lora in zip(names, loras):
        pipe.load_lora_weights(str(lora.file), adapter_name=name,
                               **({"load_into_transformer_2": True} if lora.network == SECOND_NETWORK else {}))
    pipe.set_adapters(names, adapter_weights=[lora.strength for lora in loras])
    pipe.fuse_lora(components=sorted({lora.network for lora in loras}), adapter_names=names)
    pipe.unload_lora_weights()  # the PEFT layers go, the fused weights stay: a plain base for the phase experts
    if quantize != "none":
        for network in NETWORKS:
            if getattr(pipe, network, None) is not None:
                quantize_module(getattr(pipe, network), quantize)
