"""Models the app keeps in memory: teachers by id (each loaded once), the students on them, the metrics probe.

load_student injects a student's LoRA adapters into its teacher's network. A small teacher (the built-in one)
gets a deep copy per student, so the plain teacher stays adapter-free and every student has its own lock. A big
one (a diffusers pipeline) is never copied: its one loaded student shares the network and the lock -- with the
adapters disabled the network *is* the teacher, exactly -- and picking another student of it loads the teacher
afresh (two sets of phase adapters cannot share one network). One GPU holds one real model: loading another
teacher first drops the big ones loaded before (and their students). A student's experts switch adapters on the
network while sampling, so two requests must not sample it at once: each network has a lock.
"""
from __future__ import annotations

import copy
import gc
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdmd.builtin import metrics
from pdmd.students.roles import MANIFEST, Student, load_student, read_manifest
from pdmd.teachers import BUILTIN, load_teacher, teacher_key
from pdmd.teachers.base import Teacher, TeacherError

COPY_BELOW_BYTES = 256 * 2**20  # teachers smaller than this get a copy per student; bigger ones share


def network_bytes(teacher: Teacher) -> int:
    return sum(p.numel() * p.element_size() for p in teacher.model.parameters())


@dataclass
class LoadedTeacher:
    teacher: Teacher
    lock: threading.Lock = field(default_factory=threading.Lock)
    carries: Path | None = None  # the student whose adapters this network holds (shared teachers only)


@dataclass
class LoadedStudent:
    student: Student
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelStore:
    """``other_teachers`` False: only the default teacher loads. A public server sets it so that a visitor cannot
    make it download or load a model of their choosing (by the teacher box or a student's manifest)."""

    def __init__(self, teacher_name: str = BUILTIN, other_teachers: bool = True):
        self.default_teacher, self.other_teachers = teacher_name, other_teachers
        self._teachers: dict[tuple, LoadedTeacher] = {}
        self._students: dict[tuple, LoadedStudent] = {}
        self._probe = None
        self._loading = threading.RLock()

    def loaded_teacher(self, name: str | None = None, options: dict | None = None) -> LoadedTeacher:
        """The teacher ``name`` (a TeacherError names what went wrong), loaded on first use."""
        key = teacher_key(name or self.default_teacher, options)
        with self._loading:
            if key not in self._teachers:
                if not self.other_teachers and key[0] != teacher_key(self.default_teacher)[0]:
                    raise TeacherError(f"loading teachers other than {self.default_teacher!r} is turned off on "
                                       f"this public server; run the app yourself to use {key[0]}")
                if key[0] != teacher_key(self.default_teacher)[0]:
                    self._drop_big_teachers()
                entry = LoadedTeacher(load_teacher(key[0], **dict(key[1])))
                # also known by its full options, as a student's manifest records them (no second copy)
                for alias in (key, teacher_key(key[0], entry.teacher.options())):
                    self._teachers.setdefault(alias, entry)
            return self._teachers[key]

    def teacher(self, name: str | None = None, options: dict | None = None) -> Teacher:
        return self.loaded_teacher(name, options).teacher

    def teacher_lock(self, name: str | None = None, options: dict | None = None) -> threading.Lock:
        return self.loaded_teacher(name, options).lock

    def loaded_teachers(self) -> list[str]:
        with self._loading:
            return list(dict.fromkeys(key[0] for key in self._teachers))

    def student(self, folder: Path) -> LoadedStudent:
        """Load (once per folder and manifest version) a student on the teacher its manifest names."""
        folder = Path(folder).resolve()
        manifest_path = folder / MANIFEST
        key = (folder, manifest_path.stat().st_mtime if manifest_path.is_file() else 0.0)
        manifest = read_manifest(folder)
        name, options = manifest["teacher"], manifest.get("teacher_options")
        with self._loading:
            if key in self._students:
                return self._students[key]
            entry = self.loaded_teacher(name, options)
            if network_bytes(entry.teacher) < COPY_BELOW_BYTES:
                loaded = LoadedStudent(load_student(folder, copy.deepcopy(entry.teacher)))
            else:
                if entry.carries is not None:  # the network holds another student's adapters: start afresh
                    self._students = {k: s for k, s in self._students.items() if k[0] != entry.carries}
                    entry = self._reload(name, options)
                entry.carries = folder  # set before loading: a failed load may still have left adapters
                loaded = LoadedStudent(load_student(folder, entry.teacher), entry.lock)
            self._students[key] = loaded
            return loaded

    def _drop_big_teachers(self) -> None:
        """Forget every big teacher but the default one, and the students on them, before loading another."""
        default = teacher_key(self.default_teacher)[0]
        big = [e.teacher for k, e in self._teachers.items()
               if k[0] != default and network_bytes(e.teacher) >= COPY_BELOW_BYTES]
        if not big:
            return
        self._teachers = {k: e for k, e in self._teachers.items() if not any(e.teacher is t for t in big)}
        self._students = {k: s for k, s in self._students.items()
                          if not any(s.student.roles.teacher is t for t in big)}
        del big
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _reload(self, name: str, options: dict | None) -> LoadedTeacher:
        stale = self._teachers[teacher_key(name, options)]
        # dropped (under every alias) before loading the new one, so both never sit in memory at once
        self._teachers = {k: e for k, e in self._teachers.items() if e is not stale}
        return self.loaded_teacher(name, options)

    def probe(self):
        with self._loading:
            if self._probe is None:
                self._probe = metrics.load_probe()
            return self._probe
