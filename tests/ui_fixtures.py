"""Students for the app tests, written the way the trainer writes them but without training (LoRA B = 0)."""
from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pdmd.core.schedule import PhaseSchedule
from pdmd.students.folder import save_student
from pdmd.students.manifest import LoraSpec
from pdmd.students.roles import Roles, phase_adapter
from pdmd.teachers import load_teacher


def make_student(folder: Path, schedule: PhaseSchedule = PhaseSchedule((0.5,), (2, 2), 1.0)) -> Path:
    teacher = load_teacher("builtin")
    roles = Roles(teacher, [phase_adapter(k) for k in range(schedule.num_phases)], LoraSpec(rank=2, alpha=2))
    save_student(folder, roles, schedule, teacher="builtin", method="phased", student_cfg=1.0, updates_trained=0)
    return folder


def break_lora_keys(folder: Path) -> None:
    """Rename every LoRA key so it fits no module of the teacher."""
    path = folder / phase_adapter(0) / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    save_file({key.replace("unet.", "unet.no_such_block."): value for key, value in state.items()}, str(path),
              metadata=metadata)


def with_changes(data: dict, **changes) -> dict:
    """A manifest dict with fields changed; ``section__field`` changes one field inside a section."""
    data = dict(data)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        data[section] = {**data[section], field: value} if field else value
    return data


def upload_files(tmp_path: Path, source: Path) -> list[str]:
    """A student folder's files as a browser uploads a folder: same base names, each in its own temp folder."""
    paths = []
    for index, path in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        target = tmp_path / f"{source.name}-upload-{index}" / path.name
        target.parent.mkdir(parents=True)
        shutil.copy(path, target)
        paths.append(str(target))
    return paths
