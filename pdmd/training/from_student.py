"""Training on from a finished student (``train --from-student DIR --start-phase K``): whether it fits a config.

One check, used twice: by the job manager before a job is queued (so a misfit is one line in the Train tab, not
a failed job) and by the Trainer when it loads the experts (the CLI's path)."""
from __future__ import annotations

import math
from pathlib import Path

from pdmd import limits
from pdmd.core.sampling import phase_sigmas
from pdmd.students import StudentError
from pdmd.students.manifest import Manifest
from pdmd.teachers import same_teacher
from pdmd.teachers.style_loras import describe_styles, same_styles
from pdmd.training.config import ConfigError, TrainConfig


def check_student_fits(manifest: Manifest, config: TrainConfig, start_phase: int, name: str) -> None:
    """Raise ConfigError / StudentError unless experts 1..start_phase-1 of the student ``name`` can be kept
    under ``config``: the phase is in range, the teacher is the same and the kept phases sample the config's
    timesteps. (The LoRA's target modules need the loaded teacher; the Trainer checks them.)"""
    schedule = config.schedule
    if isinstance(start_phase, bool) or not isinstance(start_phase, int) or not 2 <= start_phase <= schedule.num_phases:
        raise ConfigError(f"--start-phase {start_phase!r}: the schedule has phases 1..{schedule.num_phases} and "
                          "phase 1 has no earlier expert to keep; give 2 or more")
    if not same_teacher(manifest.teacher, config.teacher):
        raise StudentError(f"{name} is a student of {manifest.teacher!r}, this config's teacher is "
                           f"{config.teacher!r}")
    if not same_styles(manifest.teacher_loras, config.teacher_loras):
        raise StudentError(f"{name}'s teacher has style LoRAs {describe_styles(manifest.teacher_loras)}, this "
                           f"config's teacher_loras are {describe_styles(config.teacher_loras)}: the same teacher "
                           "means the same ones")
    theirs = manifest.schedule
    for k in range(start_phase - 1):
        if k >= theirs.num_phases or phase_sigmas(theirs, k) != phase_sigmas(schedule, k):
            raise StudentError(f"{name}: its phase {k + 1} does not sample the timesteps of this config's "
                               f"phase {k + 1} ({theirs.describe()} vs {schedule.describe()})")
    lora, wanted = manifest.lora, config.lora
    if (lora.rank, lora.alpha) != (wanted.rank, wanted.alpha):
        raise StudentError(f"{name}: its LoRA (rank {lora.rank}, alpha {lora.alpha:g}) differs from this "
                           f"config's (rank {wanted.rank}, alpha {wanted.alpha:g})")


def student_name(folder: Path) -> str:
    """A run's student folder is called 'student': name it after its run instead."""
    return folder.parent.name if folder.name == "student" else folder.name


def served_start(config: TrainConfig, folder, start_phase, served: list[Path]) -> tuple[str, int]:
    """A request's student and phase K, checked: the folder must be one of ``served`` (never a path taken from a
    request as is: the trainer would read it), K a whole number from 2 to its phases, and the student must fit
    ``config``. Returns the folder (resolved) and K; raises StudentError / ConfigError with one line."""
    if not isinstance(folder, (str, Path)) or not str(folder) or len(str(folder)) > limits.MAX_NAME_CHARS:
        raise StudentError("pick the student to retrain from")
    student = Path(folder).resolve()
    if student not in served:
        raise StudentError("that student is not one this app serves: pick a shipped student or a finished job's")
    name = student_name(student)
    try:
        manifest = Manifest.read(student)
    except OSError as err:
        raise StudentError(f"student {name} cannot be read: {err}") from None
    phases = manifest.schedule.num_phases
    if phases < 2:
        raise StudentError(f"{name} has one phase: there is no earlier expert to keep")
    try:
        number = float(start_phase)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number == int(number) and 2 <= number <= phases):
        raise ConfigError(f"phase {start_phase!r} to retrain from must be a whole number from 2 to {phases}, the "
                          f"phases of {name}")
    try:
        check_student_fits(manifest, config, int(number), name)
    except (ConfigError, StudentError) as err:
        raise StudentError(f"cannot retrain from {name}: {err}") from None
    return str(student), int(number)
