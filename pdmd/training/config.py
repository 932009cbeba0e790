"""The distillation config: a frozen object that validates every field when it is loaded, so a bad config fails
before any work with one message naming the field."""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from numbers import Real
from pathlib import Path

import yaml

from pdmd import limits
from pdmd.conditions import ConditionError, condition_set
from pdmd.core.distill import METHODS
from pdmd.core.schedule import PhaseSchedule, ScheduleError
from pdmd.students.manifest import LoraSpec
from pdmd.teachers.base import TeacherError
from pdmd.teachers.quantize import QUANTIZATIONS
from pdmd.teachers.style_loras import StyleLora, parse_teacher_loras
from pdmd.training.optimizers import OPTIMIZERS


class ConfigError(ValueError):
    """An invalid training config; the message names the field."""


RENAMED = {"steps_per_phase": "updates_per_phase", "timestep_shift": "renoise_shift"}  # old key -> new key


def _positive(name: str, value, *, integer: bool = False, allow_zero: bool = False):
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name} = {value!r} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r} must be a number")
    if integer and value != int(value):
        raise ConfigError(f"{name} = {value!r} must be a whole number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} = {value!r} must be {'at least 0' if allow_zero else 'greater than 0'}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class TrainConfig:
    teacher: str = "builtin"
    method: str = "phased"
    schedule: PhaseSchedule = field(default_factory=lambda: METHODS["phased"].schedule)
    output_dir: str = "runs/student"
    updates_per_phase: tuple[int, ...] = (200,)   # generator updates of each phase (one value: every phase)
    batch_size: int = 8
    fake_ratio: int = 5                          # fake-score updates per generator update (paper, DMD2)
    # what the fake score trains on: "fresh" rollouts of its own (fake_ratio more rollouts per update), or
    # "generator": the generator update's own x_s, after that update, as DMD2 does (no extra rollouts)
    fake_rollout: str = "fresh"
    lr_generator: float = 1e-4
    lr_fake: float = 1e-4
    # the generator's learning rate over each phase: "constant", or "linear" to zero at the phase's end (the last
    # updates anneal instead of adding noise); the fake score keeps its rate, as it must go on tracking the student
    lr_decay: str = "constant"
    # a warm start by regression on the teacher's own trajectories (distill.regression_loss): the first
    # regression_updates updates of every phase (at most half of it: warm_start_updates) regress expert k's steps
    # from the teacher's x_{t_{k-1}} onto its x_{t_k} instead of the DMD loss (no fake updates), over
    # regression_pairs noises solved once by the teacher with regression_teacher_steps Euler steps per phase
    # (seeded: a resumed run solves the same pairs); 0 = off
    regression_updates: int = 0
    regression_pairs: int = 32
    regression_teacher_steps: int = 6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0                       # 0 = off
    teacher_cfg: float | None = None             # the real score's guidance (method.md Eq. (15); None: the teacher's
                                                 # default); the fake score uses none
    student_cfg: float = 1.0                     # guidance when sampling the student (CFG is distilled in)
    renoise_shift: float = 1.0                   # shift of the re-noising t ~ T(s, 1) (method.md Eq. 17)
    gradient: str = "x0"                         # DMD gradient form: "x0" (DMD2) or "velocity"
    lora: LoraSpec = field(default_factory=LoraSpec)
    prompts: tuple[str, ...] = ()                # distillation is data-free: prompts only
    sample_prompts: tuple[str, ...] = ()
    # for a teacher that takes an image (Teacher.conditions; Wan 2.2 TI2V-5B: the first frame): a folder of images
    # (its prompts.txt, one line per image, or ``prompts`` cycled over them) or a list of image files; the
    # (image, prompt) pairs replace ``prompts``, and the sample grid shows the first four (pdmd.conditions); for a
    # teacher that composes several images a prompt (Qwen-Image-Edit-Plus), a folder of folders or a list of lists
    condition_images: str | tuple[str, ...] | None = None
    # without condition_images, who draws them (pdmd.training.conditioning): "self" (the teacher, from its prompts
    # alone: an editing model's default), a text-to-image teacher's id or folder (for one that cannot: Wan 2.1
    # I2V, Qwen-Image-Edit), or "none" (distil text-only: Wan 2.2 TI2V-5B's default, a text-to-video model too)
    condition_teacher: str | None = None
    sample_every: int = 50
    # measure the student on the fixed probe set (12 eval prompts x probe_per_prompt images, seed 0) every this many
    # updates and at the end, into probe.jsonl: the adherence / FD curve against training time (built-in teacher;
    # 0 = off). 96 images cost about one phase-2 update, so every 25 updates adds ~4%.
    probe_every: int = 0
    probe_per_prompt: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    mixed_precision: str = "no"                  # "no", "bf16" or "fp16" (accelerate)
    # true: recompute activations in every backward pass; "rollout": only in the generator's, whose graph spans all
    # of its phase's Euler steps (the peak), so the fake score's updates keep their speed
    gradient_checkpointing: bool | str = False
    # the teacher's loading (diffusers teachers; see pdmd.teachers.load_teacher): weight dtype ("fp32", "bf16",
    # "fp16"; empty: bf16 on CUDA, fp32 on the CPU -- mixed_precision above is autocast, this is storage),
    # text encoders and VAE kept on the CPU, and the resolution distilled at (empty: the pipeline's own)
    dtype: str | None = None
    offload: bool = False
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    # style LoRAs fused into the diffusers teacher before anything else ([{file, strength, network}]; "distil my
    # model": the teacher is base + style, and the student records and keeps a copy of each; pdmd.teachers.style_loras)
    teacher_loras: tuple[StyleLora, ...] = ()
    report_to: str = "none"                      # "tensorboard" logs through accelerate's trackers too
    seed: int = 0
    # the frozen transformer(s) loaded quantized: "none", "int8", "fp8" (torchao, CPU or GPU) or "nf4"
    # (bitsandbytes, CUDA); LoRA experts and the fake adapter train on top (pdmd.teachers.quantize)
    quantize: str = "none"
    # the adapters' optimizer: "adamw" (torch) or "adamw8bit" (torchao's 8-bit states; pdmd.training.optimizers)
    optimizer: str = "adamw"
    # shard the frozen base across the launched processes with FSDP2 (pdmd.training.fsdp); adapters stay whole
    fsdp: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method = {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise ConfigError("teacher is missing: give a teacher id such as 'builtin' or a model folder")
        schedule = self.schedule
        if not isinstance(schedule, PhaseSchedule):
            try:
                schedule = PhaseSchedule.from_dict(schedule)
            except ScheduleError as err:
                raise ConfigError(f"schedule: {err}") from None
        if not self.method.startswith("phased") and schedule.num_phases != 1:
            raise ConfigError(f"schedule has {schedule.num_phases} phases but method {self.method!r} "
                              "is single-phase; remove the boundaries or use a phased method")
        steps = self.updates_per_phase
        steps = (steps,) * schedule.num_phases if isinstance(steps, Real) else tuple(steps)
        if len(steps) == 1:
            steps *= schedule.num_phases
        if len(steps) != schedule.num_phases:
            raise ConfigError(f"updates_per_phase {list(steps)} does not fit the schedule's "
                              f"{schedule.num_phases} phases; give one value or one per phase")
        steps = tuple(_positive(f"updates_per_phase[{k}]", n, integer=True) for k, n in enumerate(steps))
        lora = self.lora if isinstance(self.lora, LoraSpec) else self._lora(self.lora)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("schedule", schedule)
        set_("updates_per_phase", steps)
        set_("lora", lora)
        for name in ("batch_size", "fake_ratio", "sample_every", "checkpoint_every", "keep_checkpoints",
                     "probe_per_prompt"):
            set_(name, _positive(name, getattr(self, name), integer=True))
        set_("probe_every", _positive("probe_every", self.probe_every, integer=True, allow_zero=True))
        set_("regression_updates", _positive("regression_updates", self.regression_updates, integer=True,
                                             allow_zero=True))
        for name, high in (("regression_pairs", limits.MAX_REGRESSION_PAIRS),
                           ("regression_teacher_steps", limits.MAX_STUDENT_STEPS)):
            set_(name, _positive(name, getattr(self, name), integer=True))
            if getattr(self, name) > high:
                raise ConfigError(f"{name} = {getattr(self, name)} must be at most {high}")
        if self.probe_every and self.teacher != "builtin":
            raise ConfigError("probe_every measures with the built-in teacher's probe; other teachers have none: "
                              "set it to 0")
        if self.probe_per_prompt > limits.MAX_PROBE_PER_PROMPT:
            raise ConfigError(f"probe_per_prompt = {self.probe_per_prompt} must be at most "
                              f"{limits.MAX_PROBE_PER_PROMPT}")
        for name in ("lr_generator", "lr_fake", "grad_clip", "renoise_shift"):
            set_(name, _positive(name, getattr(self, name)))
        for name in ("weight_decay", "teacher_cfg", "student_cfg"):
            if getattr(self, name) is not None:
                set_(name, _positive(name, getattr(self, name), allow_zero=True))
        for name in ("teacher_cfg", "student_cfg"):
            if getattr(self, name) is not None and getattr(self, name) > limits.MAX_CFG:
                raise ConfigError(f"{name} = {getattr(self, name)!r} must be at most {limits.MAX_CFG:g}")
        set_("seed", _positive("seed", self.seed, integer=True, allow_zero=True))
        if not limits.MIN_SHIFT <= self.renoise_shift <= limits.MAX_SHIFT:
            raise ConfigError(f"renoise_shift = {self.renoise_shift:g} must lie between {limits.MIN_SHIFT:g} and "
                              f"{limits.MAX_SHIFT:g}")
        set_("ema_decay", _positive("ema_decay", self.ema_decay, allow_zero=True))
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay = {self.ema_decay!r} must be in [0, 1)")
        if self.lr_decay not in ("constant", "linear"):
            raise ConfigError(f"lr_decay = {self.lr_decay!r} must be 'constant' or 'linear'")
        if self.fake_rollout not in ("fresh", "generator"):
            raise ConfigError(f"fake_rollout = {self.fake_rollout!r} must be 'fresh' or 'generator'")
        if self.gradient not in ("x0", "velocity"):
            raise ConfigError(f"gradient = {self.gradient!r} must be 'x0' or 'velocity'")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision = {self.mixed_precision!r} must be 'no', 'bf16' or 'fp16'")
        if self.dtype is not None and self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype = {self.dtype!r} must be 'fp32', 'bf16' or 'fp16'")
        if not isinstance(self.offload, bool):
            raise ConfigError(f"offload = {self.offload!r} must be true or false")
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "rollout"):
            raise ConfigError(f"gradient_checkpointing = {self.gradient_checkpointing!r} must be true, false or "
                              "'rollout'")
        for name, high in (("height", limits.MAX_SIDE), ("width", limits.MAX_SIDE), ("num_frames", limits.MAX_FRAMES)):
            if getattr(self, name) is not None:
                set_(name, _positive(name, getattr(self, name), integer=True))
                if getattr(self, name) > high:
                    raise ConfigError(f"{name} = {getattr(self, name)} must be at most {high}")
        try:
            set_("teacher_loras", parse_teacher_loras(self.teacher_loras))
        except TeacherError as err:
            raise ConfigError(str(err)) from None
        loading = [n for n in ("dtype", "offload", "height", "width", "num_frames", "teacher_loras")
                   if getattr(self, n) not in (None, False, ())]
        if self.teacher == "builtin" and loading:
            raise ConfigError(f"{', '.join(loading)} apply to diffusers teachers; the built-in teacher has fixed ones")
        if self.report_to not in ("none", "tensorboard"):
            raise ConfigError(f"report_to = {self.report_to!r} must be 'none' or 'tensorboard'")
        for name in ("prompts", "sample_prompts"):
            value = self.__dict__[name]
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a list of prompt strings")
            set_(name, tuple(value))
        self._check_condition_images()
        if self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"quantize = {self.quantize!r} is unknown; choose one of {', '.join(QUANTIZATIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer = {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"fsdp = {self.fsdp!r} must be true or false")
        if self.fsdp and self.probe_every:
            raise ConfigError("fsdp: true cannot probe while training (rank 0 alone cannot run a sharded network): "
                              "set probe_every to 0 and evaluate the finished student")
        if self.fsdp and self.sample_every <= self.total_updates:  # rank 0 alone cannot run a sharded network
            raise ConfigError("fsdp: true draws no samples while training: set sample_every above the run's "
                              f"{self.total_updates} updates and sample the finished student")
        if self.fsdp and self.quantize != "none":  # measured: pdmd.training.fsdp
            raise ConfigError(f"fsdp: true cannot shard a quantized base (quantize = {self.quantize!r}: its weights "
                              "do not split under fully_shard): set quantize: none, or fsdp: false on one device")

    def _check_condition_images(self) -> None:
        """Every condition image opened and paired with its prompt now, so a bad one stops the run before any
        work; the teacher's side (does it take an image?) is checked where it is loaded."""
        spec = self.condition_images
        chooser = self.condition_teacher
        if chooser is not None and (not isinstance(chooser, str) or not chooser.strip()):
            raise ConfigError("condition_teacher must be 'self', 'none' or a text-to-image teacher's id or folder")
        if chooser is not None:
            object.__setattr__(self, "condition_teacher", chooser.strip())
            if self.teacher == "builtin" and chooser.strip() != "none":
                raise ConfigError("condition_teacher: the built-in teacher is a text-only teacher: it takes no image")
            if spec is not None and chooser.strip() != "none":
                raise ConfigError("condition_images and condition_teacher both say where the run's images come "
                                  "from: give one")
        if spec is None:
            return
        def files(item) -> bool:
            return isinstance(item, str) or (isinstance(item, (list, tuple)) and all(isinstance(f, str) for f in item))
        if isinstance(spec, (list, tuple)) and all(files(item) for item in spec):  # a file, or one prompt's files
            object.__setattr__(self, "condition_images",
                               tuple(item if isinstance(item, str) else tuple(item) for item in spec))
        elif not isinstance(spec, str):
            raise ConfigError("condition_images must be a folder or a list of image files (or of lists of them, a "
                              "prompt's several images)")
        if self.teacher == "builtin":
            raise ConfigError("condition_images: the built-in teacher is a text-only teacher: it takes no image")
        if self.sample_prompts:
            raise ConfigError("sample_prompts: a run on condition_images shows its first condition images with their "
                              "prompts in the sample grid; remove sample_prompts")
        try:
            condition_set(self.condition_images, list(self.prompts))
        except ConditionError as err:
            raise ConfigError(f"condition_images: {err}") from None

    def condition_pairs(self) -> list:
        """The (image file, prompt) pairs of ``condition_images`` (pdmd.conditions.condition_set), or []."""
        return [] if self.condition_images is None else condition_set(self.condition_images, list(self.prompts))

    @staticmethod
    def _lora(data) -> LoraSpec:
        if not isinstance(data, dict) or set(data) - {"rank", "alpha", "target_modules"}:
            raise ConfigError(f"lora = {data!r} must be a mapping with rank, alpha, target_modules")
        rank = _positive("lora.rank", data.get("rank", LoraSpec.rank), integer=True)
        if rank > limits.MAX_LORA_RANK:
            raise ConfigError(f"lora.rank = {rank} must be at most {limits.MAX_LORA_RANK}")
        alpha = _positive("lora.alpha", data.get("alpha", LoraSpec.alpha))
        modules = data.get("target_modules", LoraSpec.target_modules)  # absent: the teacher's own
        if isinstance(modules, str) or ("target_modules" in data and not modules):
            raise ConfigError("lora.target_modules must be a non-empty list of module names")
        return LoraSpec(rank, alpha, tuple(modules))

    def teacher_options(self) -> dict:
        """Keyword arguments of load_teacher for this config's teacher (none for the built-in one)."""
        quantized = {"quantize": self.quantize} if self.quantize != "none" else {}
        if self.teacher == "builtin":
            return quantized
        options = {**quantized, "dtype": self.dtype, "offload": self.offload, "height": self.height, "width": self.width,
                   "num_frames": self.num_frames, "teacher_loras": self.teacher_loras}
        return {k: v for k, v in options.items() if v not in (None, False, ())}

    @property
    def total_updates(self) -> int:
        return sum(self.updates_per_phase)

    def warm_start_updates(self, phase: int) -> int:
        """The regression updates that open ``phase``: at most half its updates, so a preset's warm start still
        leaves the DMD updates their share when a form shortens the phases."""
        return min(self.regression_updates, self.updates_per_phase[phase] // 2)

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "TrainConfig":
        data = {**(data or {}), **{k: v for k, v in overrides.items() if v is not None}}
        old = sorted(k for k in RENAMED if k in data)
        if old:
            both = [k for k in old if RENAMED[k] in data]
            if both:
                raise ConfigError(f"{both[0]} and {RENAMED[both[0]]} are the same field: keep {RENAMED[both[0]]}")
            warnings.warn(f"config keys {old} are now {[RENAMED[k] for k in old]}; the old names still load",
                          FutureWarning, stacklevel=3)
            data = {RENAMED.get(k, k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of fields")
        return cls.from_dict(data, **overrides)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["schedule"] = self.schedule.as_dict()
        data["updates_per_phase"] = list(self.updates_per_phase)
        data["lora"] = {"rank": self.lora.rank, "alpha": self.lora.alpha}
        if self.lora.target_modules:
            data["lora"]["target_modules"] = list(self.lora.target_modules)
        data["prompts"], data["sample_prompts"] = list(self.prompts), list(self.sample_prompts)
        data["teacher_loras"] = [lora.as_entry() for lora in self.teacher_loras]
        if isinstance(self.condition_images, tuple):  # YAML writes lists
            data["condition_images"] = [item if isinstance(item, str) else list(item) for item in self.condition_images]
        return data
