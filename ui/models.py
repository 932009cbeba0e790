"""Models the app keeps in memory: teachers by id and load options, the students on them, their manifests, and
the metrics probe -- each bounded, so no sequence of anonymous requests grows the process without limit.

load_student injects a student's LoRA adapters into its teacher's network. A small teacher (the built-in one)
gets a deep copy per student, so the plain teacher stays adapter-free and every student has its own lock. A big
one (a diffusers pipeline) is never copied: its one loaded student shares the network and the lock -- with the
adapters disabled the network *is* the teacher, exactly -- and picking another student of it loads the teacher
afresh (two sets of phase adapters cannot share one network). One GPU holds one real model: loading another
teacher first drops the big ones loaded before (and their students) and collects them, so the two never sit in
memory at once; the built-in one stays. A student's experts switch adapters on the network while sampling, so two
requests must not sample it at once: each network has a lock.

Bounds (pdmd.limits): students on small teachers are kept least-recently-used within STUDENT_CACHE_BYTES; the
default teacher at other resolutions within BUILTIN_TEACHER_COPIES; manifests are read once per file version.

Every store is reachable by its ``id`` (store_by_id): a ZeroGPU worker, forked from the app's process, finds the
models of its call in its copy of the store, as the call's arguments name them. Models load on the GPU where
there is one (placement), except on ZeroGPU, where the GPU exists only inside a call.
"""
from __future__ import annotations

import copy
import gc
import itertools
import os
import threading
import weakref
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
from pdmd.teachers.diffusers_base import DiffusersTeacher
from pdmd.teachers.quantize import module_bytes
from ui.gpu import on_zero_gpu  # first: on ZeroGPU ``spaces`` must be imported before anything asks for CUDA

COPY_BELOW_BYTES = 256 * 2**20  # teachers smaller than this get a copy per student; bigger ones share
MANIFEST_CACHE = 256            # manifests kept parsed (a few KB each)


def network_bytes(teacher: Teacher) -> int:
    """The network's real bytes (an int8 base at one byte a weight): pdmd.teachers.quantize's one counter."""
    return module_bytes(teacher.model)


def placement() -> dict:
    """load_teacher's device (and dtype) for the app's models: the GPU when there is one. Not on ZeroGPU, where the
    app's process has none: there ``spaces`` makes torch.cuda.is_available() true and ``.to("cuda")`` a placeholder
    that, once packed at launch, can no longer be copied or take LoRA adapters -- so models stay in RAM, in the
    GPU's dtype, and each spaces.GPU call moves the one it samples onto its GPU (to_device)."""
    if on_zero_gpu():
        return {"device": "cpu", "dtype": "bf16"}
    return {"device": "cuda" if torch.cuda.is_available() else "cpu"}


def sampling_device() -> str:
    """Where a sampling call runs: the GPU when there is one (inside a ZeroGPU call, there is)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_device(teacher: Teacher, device: str) -> None:
    """Move ``teacher``'s networks to ``device`` unless they are there already. A diffusers teacher keeps its
    offloaded text encoders and VAE on the CPU (each is borrowed while it runs)."""
    device = torch.device(device)
    if teacher.device.type == device.type:
        return
    if isinstance(teacher, DiffusersTeacher):  # its own placement: the memory check, offloaded modules left out
        teacher._to_device([m for m in (teacher.model, *teacher.text_encoders, teacher.pipe.vae)
                            if id(m) not in teacher._offloaded], device)
    else:
        teacher.model.to(device)


def free_memory() -> None:
    """Collect what was just dropped (a pipeline's modules hold reference cycles, so dropping the last reference
    is not enough) and give the GPU's cached blocks back: before the next model loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


_STORES: weakref.WeakValueDictionary[int, ModelStore] = weakref.WeakValueDictionary()
_STORE_IDS = itertools.count()


def store_by_id(store_id: int) -> ModelStore:
    """The store ``store_id`` names: in a ZeroGPU worker, its copy of the app's store (forked with its models)."""
    try:
        return _STORES[store_id]
    except KeyError:
        raise LookupError(f"no model store {store_id} in this process") from None


def _unlock_after_fork() -> None:
    # a fork copies a lock held by another thread (a model loading while a ZeroGPU call forks its worker) as held
    # for ever: the worker's copy of each store starts with its own, free locks
    for store in list(_STORES.values()):
        store._loading = threading.RLock()
        entries = list({id(e): e for e in (*store._teachers.values(), *store._students.values())}.values())
        fresh = {id(e.lock): threading.Lock() for e in entries}  # a student sharing its teacher's lock still does
        for entry in entries:
            entry.lock = fresh[id(entry.lock)]


os.register_at_fork(after_in_child=_unlock_after_fork)


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
        self.id = next(_STORE_IDS)
        _STORES[self.id] = self

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
            self._drop_big_teachers()
            if key[0] == default:
                self._bound_default_copies()
            entry = LoadedTeacher(load_teacher(key[0], **{**placement(), **dict(key[1])}))
            if entry.teacher.device.type == "cpu":  # oneDNN's 2-D convolutions: ~20 % faster (docs/benchmarks.md)
                for conv in (m for m in entry.teacher.model.modules() if isinstance(m, torch.nn.Conv2d)):
                    conv.to(memory_format=torch.channels_last)
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
        copies = {}  # network -> its first key, least recently used first
        for key, entry in self._teachers.items():
            if key[0] == default[0]:
                copies.setdefault(id(entry), key)
        plain = id(self._teachers.get(default))
        others = [key for network, key in copies.items() if network != plain]
        self._forget(others[: max(0, len(copies) + 1 - self.default_copies)])  # + 1: the one about to load

    def _forget(self, keys) -> None:
        """Forget the teachers loaded under ``keys`` (under every alias) and the students sharing their networks.
        Keys, not entries, come in, and only comprehensions touch the entries: no name here keeps one alive."""
        dropped = {id(self._teachers[k]) for k in keys}
        networks = {id(e.teacher) for e in self._teachers.values() if id(e) in dropped}
        self._teachers = OrderedDict((k, e) for k, e in self._teachers.items() if id(e) not in dropped)
        self._students = OrderedDict((k, s) for k, s in self._students.items()
                                     if id(s.student.roles.teacher) not in networks)

    def _drop_big_teachers(self) -> None:
        """Forget every big teacher but the built-in one, and the students on them, and free their memory before
        another teacher loads: one GPU holds one real model."""
        big = [k for k, e in self._teachers.items() if k[0] != BUILTIN and network_bytes(e.teacher) >= COPY_BELOW_BYTES]
        if big:
            self._forget(big)
            free_memory()

    def _reload(self, name: str, options: dict | None) -> LoadedTeacher:
        # dropped (under every alias) and collected before loading the new one, so both never sit in memory at once
        # (the caller holds no reference to the old entry either)
        self._forget([teacher_key(name, options)])
        free_memory()
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
        name, options = manifest.teacher, manifest.teacher_load_options(folder)
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
                    carried, entry = entry.carries, None  # no reference to the old network left while it goes
                    self._students = OrderedDict((k, s) for k, s in self._students.items() if k[0] != carried)
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
