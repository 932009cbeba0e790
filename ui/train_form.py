"""The Train tab's form: the presets (the files configs/quick.yaml and configs/default.yaml, read when used, so
``python -m pdmd train --config configs/quick.yaml`` is exactly the quick demo) and the form's values as a
config dict."""
from __future__ import annotations

import os
import time

import yaml

from pdmd.core.distill import METHODS
from pdmd.core.schedule import PhaseSchedule
from pdmd.paths import CONFIGS
from pdmd.training.config import TrainConfig
from pdmd.training.jobs import JobError
from ui.inputs import schedule_of

PRESET_FILES = {"quick demo": CONFIGS / "quick.yaml", "default": CONFIGS / "default.yaml"}
QUICK = "quick demo"
METHOD_DEFAULT, FROM_PHASES, EDIT_HERE = "the method's own", "from the Phases tab", "edit here"
FORM_FIELDS = ["teacher", "method", "schedule_source", "boundaries", "schedule_steps", "shift", "rank", "alpha",
               "updates_per_phase", "lr_generator", "lr_fake", "batch_size", "fake_ratio", "sample_prompts",
               "sample_every", "checkpoint_every", "condition_images", "condition_teacher"]


def preset_config(name: str) -> dict:
    """A preset's whole config: the form shows its main fields; the rest (guidance, seed...) come along as is.
    Its output_dir is dropped: a job's run folder is runs/jobs/<name>/."""
    if name not in PRESET_FILES:
        raise JobError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_FILES)}")
    path = PRESET_FILES[name]
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise JobError(f"preset {name!r} ({path.name}) cannot be read: {err}") from None
    if not isinstance(config, dict):
        raise JobError(f"preset {name!r} ({path.name}) is not a mapping of config fields")
    config.pop("output_dir", None)
    return config


def _number(value: float) -> str:
    """A number as short text that reads back as the same float (the form must not round the file's values)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def preset_fields(name: str) -> list:
    """A preset as the form's values, in FORM_FIELDS order; its schedule is the file's, shown to edit."""
    config = TrainConfig.from_dict(preset_config(name))  # defaults filled in, every value checked
    schedule = config.schedule
    return [config.teacher, config.method, EDIT_HERE, ", ".join(map(_number, schedule.boundaries)),
            ", ".join(map(str, schedule.steps)), _number(schedule.shift), config.lora.rank, config.lora.alpha,
            ", ".join(map(str, config.updates_per_phase)), config.lr_generator, config.lr_fake, config.batch_size,
            config.fake_ratio, "\n".join(config.sample_prompts), config.sample_every, config.checkpoint_every,
            _lines(config.condition_images), config.condition_teacher or ""]


def _lines(spec) -> str:
    """condition_images as the form shows it: a folder, or one file a line."""
    return "" if spec is None else spec if isinstance(spec, str) else "\n".join(spec)


def form_config(preset, teacher, method, schedule_source, boundaries, schedule_steps, shift, phases_schedule,
                rank, alpha, updates_per_phase, lr_generator, lr_fake, batch_size, fake_ratio, sample_prompts,
                sample_every, checkpoint_every, condition_images="", condition_teacher="") -> dict:
    """The form as a config dict; TrainConfig (in JobManager.submit) then checks every value. Condition images:
    a folder on this machine (its prompts.txt beside the images) or one image file a line; empty fields leave a
    text-only teacher's run as it is (pdmd.training.conditioning says what a conditioned teacher does then)."""
    config = preset_config(preset)
    if method not in METHODS:
        raise JobError(f"method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if schedule_source == METHOD_DEFAULT:
        schedule = METHODS[method].schedule.as_dict()
    elif schedule_source == FROM_PHASES:
        schedule = schedule_of(phases_schedule).as_dict()
    else:
        schedule = PhaseSchedule.parse(boundaries or "", schedule_steps or "", shift or "").as_dict()
    steps = [s.strip() for s in str(updates_per_phase or "").split(",")]
    if not any(steps):
        raise JobError("updates per phase is empty: give one number (every phase) or one per phase")
    prompts = [line.strip() for line in (sample_prompts or "").splitlines() if line.strip()]
    images = [line.strip() for line in str(condition_images or "").splitlines() if line.strip()]
    config.pop("condition_images", None)
    config.pop("condition_teacher", None)
    if images:
        config["condition_images"] = images[0] if len(images) == 1 else images
    if str(condition_teacher or "").strip():
        config["condition_teacher"] = str(condition_teacher).strip()
    teacher = (teacher or "").strip()
    if teacher != "builtin":  # the form has no probe field: the preset's probe measures the built-in scenes only
        config.pop("probe_every", None)
    return {**config, "teacher": teacher, "method": method, "schedule": schedule,
            "updates_per_phase": steps, "lora": {**(config.get("lora") or {}), "rank": rank, "alpha": alpha},
            "lr_generator": lr_generator, "lr_fake": lr_fake, "batch_size": batch_size, "fake_ratio": fake_ratio,
            "sample_prompts": prompts, "sample_every": sample_every, "checkpoint_every": checkpoint_every}


def check_threads(value) -> int:
    cores = os.cpu_count() or 1
    try:
        threads = float(value)
    except (TypeError, ValueError):
        raise JobError(f"CPU threads {value!r} is not a number") from None
    if threads != int(threads) or not 1 <= threads <= cores:
        raise JobError(f"CPU threads {value!r} must be a whole number from 1 to {cores}")
    return int(threads)


def new_run_name(method: str) -> str:
    return f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
