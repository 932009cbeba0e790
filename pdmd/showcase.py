"""The showcase file: the teachers and students an owner lets visitors of a public server pick, and nothing else.

``PDMD_SHOWCASE=examples/showcase.yaml python app.py``. ``Showcase.read(path)`` checks every entry before the
app starts and raises :class:`ShowcaseError` with one line naming the entry and the rule it breaks, e.g.
``showcase.yaml: teachers[wan].students[lightning].strengths: 2.5 is outside [0, 2]``. Relative paths are
relative to the file. Schema (every key but ``teachers``, a teacher's ``model`` and a student's ``folder`` or
``lora`` is optional)::

    load: lazy | eager          # load each model on its first request (default), or all at start
    open: TEACHER/STUDENT       # the pair shown first (default: the first student of the first teacher)
    teachers:
      - name: wan22             # what visitors see; unique
        model: Wan-AI/Wan2.2-T2V-A14B-Diffusers   # a diffusers pipeline folder or Hub id
        dtype: bf16 | fp16 | fp32
        offload: false          # text encoders and VAE on the CPU
        quantize: none          # none | int8 | fp8 | nf4 (CUDA): the transformer(s), as load_teacher and train configs say
        teacher_loras:          # style LoRAs fused into the teacher (base + style), as in train configs
          - {file: my_style_high.safetensors, strength: 0.8}   # network: transformer, the default (high-noise)
          - {file: my_style_low.safetensors, strength: 0.8, network: transformer_2}   # Wan 2.2 A14B's low-noise one
        height: 480
        width: 832
        frames: 81
        steps: 40               # the teacher side's default steps and CFG
        cfg: 4.0
        students:
          - name: phased        # a student folder (manifest.json + one LoRA per phase)
            folder: students/wan-phased
          - name: lightning     # published LoRA files, one per phase, as `pdmd lora import` takes them
            lora: [high_noise_model.safetensors, low_noise_model.safetensors]
            boundaries: [0.875]
            steps: [2, 2]
            shift: 5.0
            strengths: [1.0, 1.0]
            cfg: 1.0
        examples:
          - {prompt: "a corgi running on a beach", seed: 42}
          - {prompt: "the cat turns its head", seed: 0, image: cat.png}   # for a teacher that takes an image
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pdmd import limits
from pdmd.conditions import ConditionError, open_image
from pdmd.core.schedule import PhaseSchedule, ScheduleError
from pdmd.students import StudentError
from pdmd.students.manifest import Manifest
from pdmd.teachers import BUILTIN, teacher_key
from pdmd.teachers.base import TeacherError
from pdmd.teachers.diffusers_base import DTYPES
from pdmd.teachers.quantize import QUANTIZATIONS, check_quantization
from pdmd.teachers.style_loras import describe_styles, parse_teacher_loras, same_styles

ENV = "PDMD_SHOWCASE"
LOADING = ("lazy", "eager")
TOP_KEYS = {"load", "open", "teachers"}
TEACHER_KEYS = {"name", "model", "dtype", "offload", "quantize", "height", "width", "frames", "steps", "cfg",
                "students", "examples", "teacher_loras"}
FOLDER_KEYS = {"name", "folder"}
LORA_KEYS = {"name", "lora", "boundaries", "steps", "shift", "strengths", "cfg"}
EXAMPLE_KEYS = {"prompt", "seed", "image"}


class ShowcaseError(ValueError):
    """An invalid showcase file; the message names the entry and the rule."""


@dataclass(frozen=True)
class ShowcaseStudent:
    name: str
    folder: Path | None = None                  # a student folder, or
    lora: tuple[Path, ...] = ()                 # published LoRA files, one per phase
    schedule: PhaseSchedule | None = None       # their schedule
    own_shift: bool = False                     # False: the schedule takes the teacher's shift
    strengths: tuple[float, ...] = ()
    cfg: float = 1.0

    @property
    def is_published(self) -> bool:
        return bool(self.lora)

    def schedule_on(self, teacher_shift: float) -> PhaseSchedule:
        if self.own_shift:
            return self.schedule
        return PhaseSchedule(self.schedule.boundaries, self.schedule.steps, teacher_shift)


@dataclass(frozen=True)
class ShowcaseTeacher:
    name: str
    model: str                                  # a folder (resolved) or a Hub id
    options: dict = field(default_factory=dict)  # load_teacher options: dtype, offload, resolution...
    steps: int | None = None
    cfg: float | None = None
    students: tuple[ShowcaseStudent, ...] = ()
    examples: tuple[tuple[str, int, Path | None], ...] = ()  # (prompt, seed, condition image or None)

    @property
    def key(self) -> str:
        return teacher_key(self.model)[0]


@dataclass(frozen=True)
class Showcase:
    source: Path
    teachers: tuple[ShowcaseTeacher, ...]
    opening: tuple[str, str]
    eager: bool = False

    # --- what visitors may pick --------------------------------------------------------------------------------
    def pairs(self) -> list[str]:
        """Every pair as ``TEACHER/STUDENT``, the value the Compare picker and the API take."""
        return [pair_name(t.name, s.name) for t in self.teachers for s in t.students]

    def pair(self, value) -> tuple[ShowcaseTeacher, ShowcaseStudent]:
        """The pair ``value`` names; anything else (another teacher, a folder, a Hub id) is refused."""
        for teacher in self.teachers:
            for student in teacher.students:
                if value == pair_name(teacher.name, student.name):
                    return teacher, student
        raise ShowcaseError(f"{str(value)[:80]!r} is not offered here; pick one of: {', '.join(self.pairs())}")

    def teacher_keys(self) -> set[str]:
        return {t.key for t in self.teachers}

    def student_folders(self) -> set[Path]:
        return {s.folder.resolve() for t in self.teachers for s in t.students if s.folder is not None}

    # --- reading -----------------------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path) -> Showcase:
        path = Path(path)
        if not path.is_file():
            raise ShowcaseError(f"{path}: no such showcase file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ShowcaseError(f"{path.name}: not valid YAML ({str(err).splitlines()[0]})") from None
        return parse(data, path)

    @classmethod
    def from_env(cls) -> Showcase | None:
        """The showcase PDMD_SHOWCASE names (ShowcaseError, one line, when it is invalid), or None."""
        import os
        path = os.environ.get(ENV, "").strip()
        return cls.read(path) if path else None


def pair_name(teacher: str, student: str) -> str:
    return f"{teacher}/{student}"


class _Entry:
    """Where in the file a value sits, for the one error line."""

    def __init__(self, file: Path, where: str = ""):
        self.file, self.where = file, where

    def at(self, part: str) -> _Entry:
        return _Entry(self.file, f"{self.where}.{part}" if self.where and not part.startswith("[") else
                      self.where + part)

    def fail(self, rule: str):
        raise ShowcaseError(f"{self.file.name}: {self.where or 'top level'}: {rule}")

    def mapping(self, value, keys: set[str]) -> dict:
        if not isinstance(value, dict):
            self.fail("must be a mapping of keys to values")
        unknown = sorted(set(value) - keys)
        if unknown:
            self.fail(f"unknown key(s) {unknown}; known: {', '.join(sorted(keys))}")
        return value

    def name(self, value) -> str:
        if not isinstance(value, str) or not value.strip() or "/" in value or len(value) > 64:
            self.at("name").fail("a name is 1-64 characters without '/'")
        return value.strip()

    def number(self, value, part: str, low: float, high: float, whole: bool = False) -> float:
        kind = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
            self.at(part).fail(f"{value!r} is outside [{low:g}, {high:g}]" if isinstance(value, (int, float))
                               and not isinstance(value, bool) else f"{value!r} must be a "
                               f"{'whole number' if whole else 'number'} in [{low:g}, {high:g}]")
        return value

    def path(self, value, part: str) -> Path:
        if not isinstance(value, str) or not value:
            self.at(part).fail("must be a path")
        path = Path(value).expanduser()
        return (path if path.is_absolute() else self.file.parent / path).resolve()


def parse(data, file: Path) -> Showcase:
    top = _Entry(Path(file))
    data = top.mapping(data, TOP_KEYS)
    load = data.get("load", "lazy")
    if load not in LOADING:
        top.at("load").fail(f"{load!r} must be one of {', '.join(LOADING)}")
    entries = data.get("teachers")
    if not isinstance(entries, list) or not entries:
        top.at("teachers").fail("must list at least one teacher")
    teachers = [_teacher(top.at(f"teachers[{k}]"), entry) for k, entry in enumerate(entries)]
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        top.at("teachers").fail(f"teacher names must be unique ({', '.join(names)})")
    pairs = [pair_name(t.name, s.name) for t in teachers for s in t.students]
    opening = data.get("open", pairs[0])
    if opening not in pairs:
        top.at("open").fail(f"{opening!r} names no pair; pairs: {', '.join(pairs)}")
    return Showcase(Path(file).resolve(), tuple(teachers), tuple(opening.split("/", 1)), load == "eager")


def _teacher(entry: _Entry, data) -> ShowcaseTeacher:
    data = entry.mapping(data, TEACHER_KEYS)
    name = entry.name(data.get("name"))
    entry = _Entry(entry.file, f"teachers[{name}]")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        entry.at("model").fail("must name a diffusers pipeline folder or a Hub id (owner/name)")
    if model == BUILTIN:
        entry.at("model").fail("the built-in teacher needs no showcase; name a diffusers pipeline folder or Hub id")
    # a folder (relative to the file) when one is there or the name has no Hub id's shape, else a Hub id
    looks_like_folder = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_folder or entry.path(model, "model").is_dir():
        folder = entry.path(model, "model")
        if not (folder / "model_index.json").is_file():
            entry.at("model").fail(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        model = str(folder)
    options = _teacher_options(entry, data)
    students = data.get("students")
    if not isinstance(students, list) or not students:
        entry.at("students").fail("must list at least one student")
    parsed = [_student(entry.at(f"students[{k}]"), s, model, options.get("teacher_loras", ()))
              for k, s in enumerate(students)]
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        entry.at("students").fail(f"student names must be unique ({', '.join(names)})")
    examples = []
    for k, example in enumerate(data.get("examples") or []):
        where = entry.at(f"examples[{k}]")
        example = where.mapping(example, EXAMPLE_KEYS)
        prompt = example.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > limits.MAX_PROMPT_CHARS:
            where.at("prompt").fail(f"must be text of 1-{limits.MAX_PROMPT_CHARS} characters")
        image = None
        if "image" in example:
            image = where.path(example["image"], "image")
            try:
                open_image(image).close()  # a bad image stops the app, as a bad model does
            except ConditionError as err:
                where.at("image").fail(str(err).replace(str(image), str(example["image"])))
        examples.append((prompt.strip(), int(where.number(example.get("seed", 0), "seed", 0, limits.MAX_SEED, True)),
                         image))
    steps = data.get("steps")
    cfg = data.get("cfg")
    return ShowcaseTeacher(
        name, model, options, None if steps is None else int(entry.number(steps, "steps", 1, limits.MAX_TEACHER_STEPS, True)),
        None if cfg is None else float(entry.number(cfg, "cfg", 0, limits.MAX_CFG)), tuple(parsed), tuple(examples))


def _teacher_options(entry: _Entry, data: dict) -> dict:
    options = {}
    if "dtype" in data:
        if data["dtype"] not in DTYPES:
            entry.at("dtype").fail(f"{data['dtype']!r} must be one of {', '.join(DTYPES)}")
        options["dtype"] = data["dtype"]
    if "offload" in data:
        if not isinstance(data["offload"], bool):
            entry.at("offload").fail("must be true or false")
        options["offload"] = data["offload"]
    quantization = data.get("quantize", "none")
    if quantization not in QUANTIZATIONS:
        entry.at("quantize").fail(f"{quantization!r} must be one of {', '.join(QUANTIZATIONS)}")
    try:
        check_quantization(quantization)  # nf4 needs bitsandbytes and CUDA, int8 / fp8 torchao
    except TeacherError as err:
        entry.at("quantize").fail(str(err))
    if quantization != "none":
        options["quantize"] = quantization
    for key, option, high in (("height", "height", limits.MAX_SIDE), ("width", "width", limits.MAX_SIDE),
                              ("frames", "num_frames", limits.MAX_FRAMES)):
        if key in data:
            options[option] = int(entry.number(data[key], key, 1, high, whole=True))
    try:
        loras = parse_teacher_loras(data.get("teacher_loras"), entry.file.parent)
    except TeacherError as err:
        entry.fail(str(err))
    if loras:
        options["teacher_loras"] = loras
    return options


def _student(entry: _Entry, data, teacher_model: str, teacher_loras: tuple) -> ShowcaseStudent:
    if not isinstance(data, dict):
        entry.fail("must be a mapping with 'folder' (a student folder) or 'lora' (published LoRA files)")
    name = entry.name(data.get("name"))
    entry = _Entry(entry.file, f"{entry.where.rsplit('.', 1)[0]}.students[{name}]")
    if ("folder" in data) == ("lora" in data):
        entry.fail("give either 'folder' (a student folder) or 'lora' (published LoRA files), not both or neither")
    if "folder" in data:
        entry.mapping(data, FOLDER_KEYS)
        folder = entry.path(data["folder"], "folder")
        try:
            manifest = Manifest.read(folder)
        except StudentError as err:
            entry.at("folder").fail(f"not a usable student folder ({str(err).replace(str(folder), data['folder'])})")
        if teacher_key(manifest.teacher)[0] != teacher_key(teacher_model)[0]:
            entry.at("folder").fail(f"is a student of {manifest.teacher!r}, not of this teacher")
        if not same_styles(manifest.teacher_loras, teacher_loras):
            entry.at("folder").fail(f"was distilled with teacher_loras [{describe_styles(manifest.teacher_loras)}], "
                                    "not this teacher's: list the same files at the same strengths")
        return ShowcaseStudent(name, folder=folder)
    entry.mapping(data, LORA_KEYS)
    files = data["lora"] if isinstance(data["lora"], list) else [data["lora"]]
    paths = tuple(entry.path(f, "lora") for f in files)
    for given, path in zip(files, paths):
        if path.suffix.lower() != ".safetensors":
            entry.at("lora").fail(f"{given}: only .safetensors LoRA files are loaded")
        if not path.is_file():
            entry.at("lora").fail(f"{given} does not exist")
    try:
        schedule = PhaseSchedule.from_dict({"boundaries": data.get("boundaries", []), "steps": data.get("steps", 2),
                                            "shift": data.get("shift", 1.0)})
    except (ScheduleError, TypeError) as err:
        entry.at("boundaries").fail(str(err))
    if schedule.num_phases != len(paths):
        entry.at("lora").fail(f"{len(paths)} file(s) for {schedule.num_phases} phase(s): give one file per phase")
    if schedule.num_phases > limits.MAX_PHASES or schedule.nfe > limits.MAX_STUDENT_STEPS:
        entry.at("steps").fail(f"at most {limits.MAX_PHASES} phases and {limits.MAX_STUDENT_STEPS} steps")
    strengths = data.get("strengths", [1.0] * len(paths))
    if not isinstance(strengths, list) or len(strengths) != len(paths):
        entry.at("strengths").fail(f"must list one strength per phase ({len(paths)})")
    strengths = tuple(float(entry.number(s, "strengths", 0, limits.MAX_STRENGTH)) for s in strengths)
    cfg = float(entry.number(data.get("cfg", 1.0), "cfg", 0, limits.MAX_CFG))
    return ShowcaseStudent(name, lora=paths, schedule=schedule, own_shift="shift" in data, strengths=strengths,
                           cfg=cfg)
