"""Models the app keeps in memory: teachers by id and load options, the students on them, their manifests, and
the metrics probe -- each bounded, so no sequence of anonymous requests grows the process without limit.

load_student injects a student's LoRA adapters into its teacher's network. A small teacher (the built-in one)
gets a deep copy per student, so the plain teacher stays adapter-free and every student has its own lock. A big
one (a diffusers pipeline) is never copied: its one loaded student shares the network and the lock -- with the
adapters disabled the network *is* the teacher, exactly -- and picking another student of it loads the teacher
afresh (two sets of phase adapters cannot share one network). One GPU holds one real model: loading another
teacher first drops the big ones loaded before (and their students). A student's experts switch adapters on the
network while sampling, so two requests must not sample it at once: each network has a lock.

Bounds (pdmd.limits): students on small teachers are kept least-recently-used within STUDENT_CACHE_BYTES; the
default teacher at other resolutions within BUILTIN_TEACHER_COPIES; manifests are read once per file version.
"""
from __future__ import annotations

import copy
import gc
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdmd import limits
from pdmd.builtin import metrics
from pdmd.students.folder import Student, load_student
from pdmd.students.manifest import MANIFEST, Manifest
from pdmd.teachers import BUILTIN, load_teacher, teacher_key
from pdmd.teachers.base import Teacher, TeacherError

COPY_BELOW_BYTES = 256 * 2**20  # teachers smaller than this get a copy per student; bigger ones share
MANIFEST_CACHE = 256            # manifests kept parsed (a few KB each)


def network_bytes(teacher: Teacher) -> int:
    return sum(p.numel() * p.element_size() for p in teacher.model.parameters())


@dataclass(eq=False)  # identity: one entry is one network in memory
class LoadedTeacher:
    teacher: Teacher
    lock: threading.Lock = field(default_factory=threading.Lock)
    carries: Path | None = None  # the student whose adapters this network holds (shared teachers only)


@dataclass(eq=False)
class LoadedStudent:
    student: Student
    lock: threading.Lock = field(default_factory=threading.Lock)
    nbytes: int = 0  # memory of its own copy of the network (0 when it shares its teacher's)


class ModelStore:
    """``other_teachers`` False: only the default teacher loads. A public server sets it so that a visitor cannot
    make it download or load a model of their choosing (by the teacher box or a student's manifest)."""

    def __init__(self, teacher_name: str = BUILTIN, other_teachers: bool = True,
                 student_budget: int = limits.STUDENT_CACHE_BYTES, default_copies: int = limits.BUILTIN_TEACHER_COPIES):
        self.default_teacher, self.other_teachers = teacher_name, other_teachers
        self.student_budget, self.default_copies = student_budget, default_copies
        self._teachers: OrderedDict[tuple, LoadedTeacher] = OrderedDict()
        self._students: OrderedDict[tuple, LoadedStudent] = OrderedDict()
        self._manifests: OrderedDict[tuple, Manifest] = OrderedDict()
        self._probe = None
        self._loading = threading.RLock()

    # --- teachers ----------------------------------------------------------------------------------------------
    def loaded_teacher(self, name: str | None = None, options: dict | None = None) -> LoadedTeacher:
        """The teacher ``name`` (a TeacherError names what went wrong), loaded on first use."""
        key = teacher_key(name or self.default_teacher, options)
        default = teacher_key(self.default_teacher)[0]
        with self._loading:
            if key in self._teachers:
                self._teachers.move_to_end(key)
                return self._teachers[key]
            if not self.other_teachers and key[0] != default:
                raise TeacherError(f"loading teachers other than {self.default_teacher!r} is turned off on "
                                   "this public server; run the app yourself to load others")
            if key[0] != default:
                self._drop_big_teachers()
            else:
                self._bound_default_copies()
            entry = LoadedTeacher(load_teacher(key[0], **dict(key[1])))
            # also known by its full options, as a student's manifest records them (no second copy)
            for alias in (key, teacher_key(key[0], entry.teacher.options())):
                self._teachers.setdefault(alias, entry)
            return entry

    def teacher(self, name: str | None = None, options: dict | None = None) -> Teacher:
        return self.loaded_teacher(name, options).teacher

    def teacher_lock(self, name: str | None = None, options: dict | None = None) -> threading.Lock:
        return self.loaded_teacher(name, options).lock

    def loaded_teachers(self) -> list[str]:
        with self._loading:
            return list(dict.fromkeys(key[0] for key in self._teachers))

    def default_teacher_copies(self) -> int:
        """Distinct loaded networks of the default teacher (one per resolution asked for)."""
        default = teacher_key(self.default_teacher)[0]
        return len({id(e) for k, e in self._teachers.items() if k[0] == default})

    def _bound_default_copies(self) -> None:
        """Before loading the default teacher at one more resolution: forget the least recently used ones beyond
        ``default_copies`` (the plain default, loaded first, is kept), and the students on them."""
        default = teacher_key(self.default_teacher)
        entries = list(dict.fromkeys(e for k, e in self._teachers.items() if k[0] == default[0]))
        plain = self._teachers.get(default)
        others = [e for e in entries if e is not plain]
        for stale in others[: max(0, len(entries) + 1 - self.default_copies)]:  # + 1: the one about to load
            self._forget_teacher(stale)

    def _forget_teacher(self, entry: LoadedTeacher) -> None:
        self._teachers = OrderedDict((k, e) for k, e in self._teachers.items() if e is not entry)
        self._students = OrderedDict((k, s) for k, s in self._students.items()
                                     if s.student.roles.teacher is not entry.teacher)

    def _drop_big_teachers(self) -> None:
        """Forget every big teacher but the default one, and the students on them, before loading another."""
        default = teacher_key(self.default_teacher)[0]
        big = list(dict.fromkeys(e for k, e in self._teachers.items()
                                 if k[0] != default and network_bytes(e.teacher) >= COPY_BELOW_BYTES))
        if not big:
            return
        for entry in big:
            self._forget_teacher(entry)
        del big
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _reload(self, name: str, options: dict | None) -> LoadedTeacher:
        # dropped (under every alias) before loading the new one, so both never sit in memory at once
        self._forget_teacher(self._teachers[teacher_key(name, options)])
        return self.loaded_teacher(name, options)

    # --- students ----------------------------------------------------------------------------------------------
    def manifest(self, folder: Path) -> Manifest:
        """The folder's manifest, read and validated once per version of the file."""
        folder = Path(folder).resolve()
        key = _version(folder)
        if key is None:
            return Manifest.read(folder)  # names what is missing
        with self._loading:
            if key not in self._manifests:
                self._manifests[key] = Manifest.read(folder)
                while len(self._manifests) > MANIFEST_CACHE:
                    self._manifests.popitem(last=False)
            self._manifests.move_to_end(key)
            return self._manifests[key]

    def student(self, folder: Path) -> LoadedStudent:
        """Load (once per folder and manifest version) a student on the teacher its manifest names."""
        folder = Path(folder).resolve()
        manifest = self.manifest(folder)
        key = _version(folder) or (folder,)
        name, options = manifest.teacher, manifest.teacher_options
        with self._loading:
            if key in self._students:
                self._students.move_to_end(key)
                return self._students[key]
            entry = self.loaded_teacher(name, options)
            if network_bytes(entry.teacher) < COPY_BELOW_BYTES:
                copied = copy.deepcopy(entry.teacher)
                loaded = LoadedStudent(load_student(folder, copied, manifest), nbytes=network_bytes(copied))
            else:
                if entry.carries is not None:  # the network holds another student's adapters: start afresh
                    self._students = OrderedDict((k, s) for k, s in self._students.items() if k[0] != entry.carries)
                    entry = self._reload(name, options)
                entry.carries = folder  # set before loading: a failed load may still have left adapters
                loaded = LoadedStudent(load_student(folder, entry.teacher, manifest), entry.lock)
            self._students[key] = loaded
            self._bound_students()
            return loaded

    def forget_student(self, folder: Path) -> None:
        """Drop a student (a rejected upload) from memory."""
        folder = Path(folder).resolve()
        with self._loading:
            self._students = OrderedDict((k, s) for k, s in self._students.items() if k[0] != folder)

    def student_bytes(self) -> int:
        return sum(s.nbytes for s in self._students.values())

    def _bound_students(self) -> None:
        """Least recently used students on their own copies go first, until the rest fit the budget (the newest
        always stays)."""
        while self.student_bytes() > self.student_budget and len(self._students) > 1:
            oldest = next((k for k, s in self._students.items() if s.nbytes), None)
            if oldest is None or oldest == next(reversed(self._students)):
                break
            del self._students[oldest]

    def probe(self):
        with self._loading:
            if self._probe is None:
                self._probe = metrics.load_probe()
            return self._probe


def _version(folder: Path) -> tuple | None:
    """(folder, mtime, size) of its manifest: a re-written manifest is a new student."""
    try:
        stat = (folder / MANIFEST).stat()
    except OSError:
        return None
    return folder, stat.st_mtime_ns, stat.st_size
