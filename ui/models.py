"""Models the app keeps in memory: one teacher, one copy of it per student, the metrics probe.

load_student injects a student's LoRA adapters into the teacher's network, so every student gets its own
deep copy of the teacher (the plain teacher stays adapter-free). A student's experts switch adapters on a
shared network while sampling, so two requests must not sample the same student at once: each has a lock.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pdmd import metrics
from pdmd.experts import MANIFEST, Student, load_student
from pdmd.teachers import load_teacher
from pdmd.teachers.base import Teacher


@dataclass
class LoadedStudent:
    student: Student
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelStore:
    def __init__(self, teacher_name: str = "builtin"):
        self.teacher_name = teacher_name
        self._teacher: Teacher | None = None
        self._probe = None
        self._students: dict[tuple[Path, float], LoadedStudent] = {}
        self._loading = threading.Lock()

    def teacher(self) -> Teacher:
        with self._loading:
            if self._teacher is None:
                self._teacher = load_teacher(self.teacher_name)
            return self._teacher

    def student(self, folder: Path) -> LoadedStudent:
        """Load (once per folder and manifest version) a student on its own copy of the teacher."""
        folder = Path(folder).resolve()
        manifest = folder / MANIFEST
        key = (folder, manifest.stat().st_mtime if manifest.is_file() else 0.0)
        teacher = self.teacher()
        with self._loading:
            if key not in self._students:
                self._students[key] = LoadedStudent(load_student(folder, copy.deepcopy(teacher)))
            return self._students[key]

    def probe(self):
        with self._loading:
            if self._probe is None:
                self._probe = metrics.load_probe()
            return self._probe
