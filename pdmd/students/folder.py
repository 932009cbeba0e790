"""The student folder: one LoRA per phase in diffusers format plus ``manifest.json`` (pdmd.students.manifest).

For a two-network teacher (Wan 2.2 A14B) each phase's LoRA is saved for the network(s) its steps run on: one
file, ``transformer.``-prefixed as diffusers' ``load_lora_weights`` expects (``load_into_transformer_2=True``
for the low-noise network), named in the manifest's ``networks``; a phase that straddles the networks' switch
gets one file per network, ``phases[k]`` then mapping network -> file.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pdmd.core.sampling import phase_sigmas, teacher_takes_phases
from pdmd.core.schedule import PhaseSchedule
from pdmd.students import StudentError
from pdmd.students.manifest import MANIFEST, Manifest, TeacherLora
from pdmd.students.roles import Roles, phase_adapter
from pdmd.teachers.base import Teacher

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name for LoRA weights
LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights records rank and alpha
SCHEDULE_METADATA_KEY = "pdmd_schedule"  # the phase schedule, so a LoRA file alone says where it belongs
TEACHER_LORA_DIR = "teacher_loras"  # copies of the style LoRAs fused into the student's teacher


def schedule_metadata(schedule: PhaseSchedule, phase: int) -> dict[str, str]:
    """safetensors metadata (strings only) naming the file's phase and the whole schedule it is part of."""
    return {"pdmd_phase": phase_adapter(phase), SCHEDULE_METADATA_KEY: json.dumps(schedule.as_dict())}


def networks_of_phase(teacher: Teacher, schedule: PhaseSchedule, phase: int) -> tuple[str, ...]:
    """The networks of a two-network teacher that ``phase``'s sampling steps run on, in the teacher's order."""
    if not teacher.network_names:
        return ()
    used = {teacher.network_at(t) for t in phase_sigmas(schedule, phase)[:-1]}
    return tuple(name for name in teacher.network_names if name in used)


def warn_about_shared_phases(teacher: Teacher, schedule: PhaseSchedule) -> None:
    """A two-network teacher's phase whose steps run on both networks is saved as one LoRA per network; say so
    before training, since published students (Wan2.2-Lightning) have one network per phase."""
    for k in range(schedule.num_phases):
        used = networks_of_phase(teacher, schedule, k)
        if len(used) > 1:
            times = ", ".join(f"{t:.3g}" for t in phase_sigmas(schedule, k)[:-1])
            warnings.warn(f"phase {k + 1} has steps at t = {times}, on both networks {' and '.join(used)} (a step "
                          "runs on the network of the t it starts from): its LoRA is saved for each; for one "
                          "network per phase, keep each phase's steps on one side of the switch", stacklevel=2)


def teacher_fields(teacher: Teacher, folder: Path) -> dict:
    """The manifest's record of how ``teacher`` loads: its options, and its style LoRAs, each copied into
    ``folder/teacher_loras/`` so that the student rebuilds base + style wherever the folder goes."""
    options = dict(teacher.options())
    records, names = [], set()
    for k, lora in enumerate(options.pop("teacher_loras", ())):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", lora.file.stem)[:64] + ".safetensors"
        name = f"{k + 1}-{name}" if name in names else name  # two files of one name from different folders
        names.add(name)
        (folder / TEACHER_LORA_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lora.file, folder / TEACHER_LORA_DIR / name)
        records.append(TeacherLora(f"{TEACHER_LORA_DIR}/{name}", lora.sha256, lora.strength, lora.network))
    pipe = getattr(teacher, "pipe", None)  # a diffusers teacher's pipeline class: what its card's snippet loads
    return {"teacher_options": options, "teacher_loras": tuple(records),
            "pipeline": type(pipe).__name__ if pipe is not None else None}


def save_student(folder: Path, roles: Roles, schedule: PhaseSchedule, **provenance) -> Manifest:
    """phase_k/pytorch_lora_weights.safetensors (diffusers layout: ``<prefix>.<module>.lora_A.weight``, with rank
    and alpha in diffusers' metadata) and manifest.json with the schedule and ``provenance`` (teacher, method,
    student_cfg, updates...: Manifest fields)."""
    teacher = roles.teacher
    prefix = teacher.lora_prefix
    config = {f"{prefix}.r": roles.lora.rank, f"{prefix}.lora_alpha": roles.lora.alpha,
              f"{prefix}.target_modules": list(roles.lora.target_modules)}

    def write(relative: str, state: dict[str, Tensor], k: int) -> str:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        save_file({f"{prefix}.{key}": value.contiguous().cpu() for key, value in state.items()}, str(folder / relative),
                  metadata={"format": "pt", **schedule_metadata(schedule, k), LORA_METADATA_KEY: json.dumps(config)})
        return relative

    phases, networks = [], []
    for k in range(schedule.num_phases):
        name = phase_adapter(k)
        state = roles.state_dict(name)
        if not teacher.network_names:
            phases.append(write(f"{name}/{LORA_WEIGHT_NAME}", state, k))
            continue
        # the adapter lives in every network; only those the phase runs on were trained (the rest stay B = 0)
        used = networks_of_phase(teacher, schedule, k)
        parts = {n: {key[len(n) + 1:]: v for key, v in state.items() if key.startswith(f"{n}.")} for n in used}
        if len(used) == 1:
            phases.append(write(f"{name}/{LORA_WEIGHT_NAME}", parts[used[0]], k))
            networks.append(used[0])
        else:
            phases.append({n: write(f"{name}/{n}/{LORA_WEIGHT_NAME}", parts[n], k) for n in used})
            networks.append(tuple(used))
    manifest = Manifest(schedule=schedule, phases=tuple(phases), lora=roles.lora, lora_prefix=prefix,
                        family=teacher.family, **teacher_fields(teacher, folder),
                        networks=tuple(networks) or None, **provenance)
    manifest.write(folder)
    return manifest


@dataclass
class Student:
    folder: Path
    manifest: Manifest
    roles: Roles

    @property
    def schedule(self) -> PhaseSchedule:
        return self.manifest.schedule

    @property
    def cfg(self) -> float:
        return self.manifest.student_cfg

    @property
    def experts(self):
        """One inference velocity per phase, each run on its merged weights. Used outside ``sample``, they leave
        the last phase's weights in the network: wrap the use in ``roles.active(None)`` if the same network
        serves the plain teacher afterwards."""
        return [self.roles.folded_velocity(phase_adapter(k)) for k in range(self.schedule.num_phases)]

    def teacher_steps_per_phase(self, schedule: PhaseSchedule | None = None) -> int:
        """Euler steps the teacher takes in a phase handed back to it: its own step count split evenly over the
        phases (16 of the built-in teacher's 32 for a two-phase student)."""
        return max(1, self.roles.teacher.default_steps // (schedule or self.schedule).num_phases)

    def with_teacher_phases(self, phases=(), schedule: PhaseSchedule | None = None, teacher_steps: int | None = None,
                            teacher_cfg: float | None = None) -> tuple[PhaseSchedule, list, tuple[float, ...]]:
        """(schedule, experts, CFG per phase) for ``Teacher.sample``: this student on ``schedule`` (default: its
        own) with the 0-based ``phases`` taken by the teacher -- its velocity at ``teacher_cfg`` (default: its
        own CFG) with ``teacher_steps`` Euler steps (default: teacher_steps_per_phase) on each such phase's
        interval (pdmd.core.sampling.teacher_takes_phases). No phases: the student itself. Wrap the sampling in
        ``roles.active(None)``, as ``sample`` does."""
        schedule = schedule or self.schedule
        teacher = self.roles.teacher
        return teacher_takes_phases(schedule, self.experts, self.cfg, self.roles.velocity(None),
                                    teacher.default_cfg if teacher_cfg is None else teacher_cfg, phases,
                                    teacher_steps or self.teacher_steps_per_phase(schedule))

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, callback=None, teacher_phases=(), images: list | None = None):
        """The student's samples; ``teacher_phases`` (0-based) are taken by the teacher (with_teacher_phases);
        ``images``: one per prompt (pdmd.conditions.open_image) for a student distilled on condition images."""
        check_images(self.folder, self.manifest, images)
        schedule, experts, cfg = self.with_teacher_phases(teacher_phases)
        with self.roles.active(None):  # on exit the network holds the base weights again, not a merged phase
            return self.roles.teacher.sample(prompts, seed, schedule, cfg, experts, callback, images=images)


def check_images(folder: Path, manifest: Manifest, images: list | None) -> None:
    """StudentError unless images come exactly when the student was distilled on them: its experts learnt either
    from a condition image (image-to-video) or without one, not both."""
    if "image" in manifest.conditions and not images:
        raise StudentError(f"{folder} was distilled on {manifest.condition_images or 'its'} condition image(s): "
                           "give one image per prompt (--image)")
    if images and "image" not in manifest.conditions:
        raise StudentError(f"{folder} was distilled on prompts alone: it takes no image; sample the teacher "
                           f"({manifest.teacher}) with one, or this student without it")


def load_student(folder: str | Path, teacher: Teacher | None = None, manifest: Manifest | None = None) -> Student:
    """Attach a student's per-phase LoRAs to ``teacher`` (whose network then carries the adapters); without
    one, the teacher the manifest names is loaded (with the resolution it was distilled at). ``manifest``: the
    folder's, when the caller has read it already."""
    folder = Path(folder)
    manifest = manifest or Manifest.read(folder)
    if teacher is None:
        from pdmd.teachers import load_teacher
        teacher = load_teacher(manifest.teacher, **manifest.teacher_load_options(folder))
    schedule = manifest.schedule
    roles = Roles(teacher, [phase_adapter(k) for k in range(schedule.num_phases)], manifest.lora)
    load_phases(roles, folder, manifest, range(schedule.num_phases))
    return Student(folder, manifest, roles)


def load_phases(roles: Roles, folder: Path, manifest: Manifest, phases) -> None:
    """Load the student folder's LoRA of each 0-based phase in ``phases`` into adapter ``phase_k`` of ``roles``."""
    prefix = re.escape(manifest.lora_prefix) + r"\."
    files = phase_files(folder, manifest, roles.teacher)
    for k in phases:
        state = {}
        for network, relative in files[k].items():
            module = "" if network is None else f"{network}."
            state.update({module + re.sub(f"^{prefix}", "", key): v
                          for key, v in read_lora(folder, relative, k).items()})
        try:
            roles.load_state_dict(phase_adapter(k), state)
        except StudentError as error:
            raise StudentError(f"{folder}, phase {k + 1} ({', '.join(files[k].values())}): {error}") from None


def phase_files(folder: Path, manifest: Manifest, teacher: Teacher) -> list[dict[str | None, str]]:
    """Per phase, network -> file (network None for a one-network teacher), checked against the teacher."""
    where = folder / MANIFEST
    if bool(manifest.networks) != bool(teacher.network_names):
        raise StudentError(f"{where}: the student was made for a teacher with "
                           f"{'two networks' if manifest.networks else 'one network'} but {teacher.name} has "
                           + (f"networks {', '.join(teacher.network_names)}" if teacher.network_names else "one"))
    result = [manifest.phase_files(k) for k in range(len(manifest.phases))]
    for k, files in enumerate(result):
        unknown = [n for n in files if n is not None and n not in teacher.network_names]
        if unknown:
            raise StudentError(f"{where}: phase {k + 1} names network(s) {unknown}; {teacher.name} has "
                               f"{', '.join(teacher.network_names)}")
    return result


def read_lora(folder: Path, relative: str, k: int) -> dict[str, Tensor]:
    path = (folder / relative).resolve()
    if folder.resolve() not in path.parents or path.suffix != ".safetensors":
        raise StudentError(f"{folder / MANIFEST}: phase file {relative!r} must be a .safetensors inside the folder")
    if not path.is_file():
        raise StudentError(f"{path} is missing (phase {k + 1} of {folder})")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise StudentError(f"{path} is not a readable safetensors file ({err})") from None

