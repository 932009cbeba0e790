"""Where students come from: shipped ones in assets/students, finished runs under runs/, and uploads.

Security: a student is only ever loaded from one of these roots (a client can post any string as the
picker's value). An upload is checked completely before anything is kept: at most MAX_UPLOAD_FILES files of
.safetensors plus one manifest.json within a size limit, the manifest through the validated Manifest type
(every field's type and range), and -- by the caller -- its LoRA shapes against the teacher; it is written
under a name the app makes up itself, never a name or path the client sent, and removed on any failure. A
folder on disk whose manifest does not validate is left out of the picker with a warning, so one broken or
hostile folder never breaks the list for everyone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from pdmd import limits
from pdmd.paths import SHIPPED_STUDENTS, runs_dir, uploads_dir
from pdmd.students import StudentError
from pdmd.students.folder import LORA_WEIGHT_NAME
from pdmd.students.manifest import MANIFEST, PICKLE_SUFFIXES, Manifest
from pdmd.students.roles import phase_adapter
from pdmd.teachers import BUILTIN, same_teacher

BASELINE = "baseline"  # the undistilled teacher run on the student's schedule: a reference, not a student
BASELINE_LABEL = "Baseline: undistilled teacher on the Phases schedule"
log = logging.getLogger(__name__)


def student_roots() -> list[Path]:
    return [SHIPPED_STUDENTS.resolve(), runs_dir()]


@dataclass(frozen=True)
class StudentChoice:
    label: str
    folder: Path
    manifest: Manifest


def student_name(folder: Path) -> str:
    """A run's student folder is called 'student': name it after its run instead."""
    return folder.parent.name if folder.name == "student" else folder.name


def _label(folder: Path, kind: str, manifest: Manifest) -> str:
    name = student_name(folder)
    phases = manifest.schedule.num_phases
    if manifest.is_published:
        files = ", ".join(manifest.published.get("files", []))
        return f"{kind}: {name} (published LoRA, {phases} phase(s): {files})"
    return f"{kind}: {name} ({manifest.method}, {phases} phase(s), {manifest.updates_trained} updates trained)"


def _choices(manifests: list[Path], kind: str) -> list[StudentChoice]:
    found = []
    for path in manifests:
        if any(part.startswith(".") for part in path.parent.parts[-2:]):
            continue  # an export or upload being written (".tmp-...") or set aside
        try:
            manifest = Manifest.read(path.parent)
        except (StudentError, OSError) as err:
            log.warning("student list: skipped %s (%s)", path.parent, err)
            continue
        found.append(StudentChoice(_label(path.parent, kind, manifest), path.parent, manifest))
    return found


def discover_students() -> list[StudentChoice]:
    """Every folder with a valid manifest.json: shipped students first, then runs (newest first), then uploads."""
    found = _choices(sorted(SHIPPED_STUDENTS.rglob(MANIFEST)), "shipped") if SHIPPED_STUDENTS.is_dir() else []
    runs = runs_dir()
    if runs.is_dir():
        manifests = [m for m in runs.rglob(MANIFEST) if uploads_dir() not in m.parents]
        found += _choices(sorted(manifests, key=lambda m: m.stat().st_mtime, reverse=True), "run")
        if uploads_dir().is_dir():
            found += _choices(sorted(uploads_dir().glob(f"*/{MANIFEST}")), "upload")
    return found


def default_choice(teacher: str | None = None, choices: list[tuple[str, str]] | None = None) -> str:
    """The app opens on the shipped phased student (the method's story); another teacher opens on its newest
    student (from ``choices``, its picker list, when the caller has it); else the baseline."""
    phased = SHIPPED_STUDENTS / "phased"
    if teacher in (None, BUILTIN):
        return str(phased) if (phased / MANIFEST).is_file() else BASELINE
    own = (picker_choices(teacher) if choices is None else choices)[1:]
    return own[0][1] if own else BASELINE


def picker_choices(teacher: str | None = None) -> list[tuple[str, str]]:
    """The baseline and every student, or only the students of ``teacher``."""
    found = [c for c in discover_students() if teacher is None or same_teacher(c.manifest.teacher, teacher)]
    return [(BASELINE_LABEL, BASELINE)] + [(c.label, str(c.folder)) for c in found]


def resolve_student_folder(value) -> Path:
    """The picker's value -> a student folder inside one of the app's own roots, or StudentError."""
    if not value or not isinstance(value, str) or len(value) > limits.MAX_NAME_CHARS:
        raise StudentError("pick a student (or the baseline)")
    folder = Path(value).resolve()
    if not any(root == folder or root in folder.parents for root in student_roots()):
        raise StudentError("that is not one of the app's student folders")
    return folder


# --- uploads -----------------------------------------------------------------------------------------------
def sanitise(name: str, fallback: str = "student") -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:40]
    return cleaned or fallback


def _check_upload_files(paths: list[Path]) -> tuple[Path, list[Path]]:
    if not paths:
        raise StudentError("no files uploaded: choose the student folder (manifest.json + phase_k/*.safetensors)")
    if len(paths) > limits.MAX_UPLOAD_FILES:
        raise StudentError(f"{len(paths)} files uploaded; the limit is {limits.MAX_UPLOAD_FILES}")
    manifests, weights, total = [], [], 0
    for path in paths:
        name = path.name
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise StudentError(f"{name} refused: pickle files are never loaded; upload .safetensors only")
        if name == MANIFEST:
            manifests.append(path)
        elif path.suffix == ".safetensors":
            weights.append(path)
        else:
            raise StudentError(f"{name} refused: only .safetensors files and one manifest.json are accepted")
        total += path.stat().st_size
    if total > limits.MAX_UPLOAD_BYTES:
        raise StudentError(f"upload is {total / 2**20:.1f} MiB; the limit is {limits.MAX_UPLOAD_BYTES / 2**20:.0f} MiB")
    if len(manifests) != 1:
        raise StudentError(f"a student needs exactly one {MANIFEST}; the upload has {len(manifests)}")
    return manifests[0], weights


def _phase_of_weights(path: Path, phases: int) -> int:
    """0-based phase of an uploaded LoRA file: the trainer's metadata tag, else a phase_k file name."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            tag = (handle.metadata() or {}).get("pdmd_phase", "")
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise StudentError(f"{path.name} is not a readable safetensors file ({err})") from None
    match = re.fullmatch(r"phase_(\d+)", tag) or re.match(r"phase_(\d+)", path.stem)
    if not match or not 1 <= int(match.group(1)) <= phases:
        raise StudentError(f"{path.name}: cannot tell which of the {phases} phases it belongs to "
                           "(name it phase_k.safetensors or upload the trainer's student folder)")
    return int(match.group(1)) - 1


def import_upload(paths: list[str | Path]) -> Path:
    """Check an uploaded student completely, then copy it into runs/uploads/<method>-<hash>/ in the standard
    layout and return that folder; nothing is kept when a check fails. (The caller then loads it once, which
    checks every LoRA shape against the teacher, and discards it if that fails.)"""
    manifest_path, weights = _check_upload_files([Path(p) for p in paths])
    manifest = Manifest.read_file(manifest_path, MANIFEST)
    if any(isinstance(entry, dict) for entry in manifest.phases):
        raise StudentError("a phase with one file per network cannot be uploaded file by file: export the "
                           "student (Export below) and import its files as a published LoRA instead")
    if manifest.teacher_loras:  # the copies of its teacher's style LoRAs would not come along
        raise StudentError("a student of a teacher with style LoRAs (teacher_loras) cannot be uploaded file by "
                           "file: put its whole folder under runs/ on the server")
    phases = len(manifest.phases)
    by_phase = {}
    for path in weights:
        phase = _phase_of_weights(path, phases)
        if phase in by_phase:
            raise StudentError(f"{path.name} and {by_phase[phase].name} both claim phase {phase + 1}")
        by_phase[phase] = path
    missing = [k + 1 for k in range(phases) if k not in by_phase]
    if missing:
        raise StudentError(f"the manifest lists {phases} phases; no .safetensors uploaded for phase(s) {missing}")

    digest = hashlib.sha256()
    for path in [manifest_path, *(by_phase[k] for k in range(phases))]:
        digest.update(path.read_bytes())
    folder = uploads_dir() / f"{sanitise(manifest.method)}-{digest.hexdigest()[:10]}"
    if (folder / MANIFEST).is_file():
        return folder  # the same upload, accepted before
    temporary = folder.with_name(f".tmp-{folder.name}")  # hidden from the picker until complete
    try:
        for k in range(phases):
            (temporary / phase_adapter(k)).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(by_phase[k], temporary / phase_adapter(k) / LORA_WEIGHT_NAME)
        Manifest.from_dict({**manifest.as_dict(), "phases": [f"{phase_adapter(k)}/{LORA_WEIGHT_NAME}"
                                                            for k in range(phases)]}).write(temporary)
        temporary.replace(folder)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    prune_uploads()
    return folder


def prune_uploads(keep: int | None = None) -> None:
    """Keep the newest ``keep`` (MAX_UPLOADED_STUDENTS) uploaded students; older ones go, so anonymous uploads
    cannot fill the disk."""
    keep = limits.MAX_UPLOADED_STUDENTS if keep is None else keep
    folders = sorted((p for p in uploads_dir().glob("*") if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in folders[keep:]:
        shutil.rmtree(stale, ignore_errors=True)


def import_published(paths: list[str | Path], teacher, teacher_name: str, schedule, strengths: list[float],
                     cfg: float) -> Path:
    """Published LoRA files (e.g. Wan2.2-Lightning's high- and low-noise pair) -> a student folder of
    ``teacher`` in runs/uploads/published-<hash>/; phase k gets the k-th file in file-name order."""
    from pdmd.students.lora_formats import make_published_student, published_folder_name

    paths = sorted((Path(p) for p in paths), key=lambda p: p.name)
    if not paths:
        raise StudentError("no files uploaded: choose the LoRA file(s), one per phase")
    total = 0
    for path in paths:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise StudentError(f"{path.name} refused: pickle files are never loaded; upload .safetensors only")
        if path.suffix.lower() != ".safetensors":
            raise StudentError(f"{path.name} refused: only .safetensors LoRA files are accepted")
        total += path.stat().st_size
    if len(paths) > limits.MAX_PHASES:
        raise StudentError(f"{len(paths)} files uploaded; a student has at most {limits.MAX_PHASES} phases")
    if total > limits.MAX_PUBLISHED_BYTES:
        raise StudentError(f"upload is {total / 2**20:.1f} MiB; the limit is "
                           f"{limits.MAX_PUBLISHED_BYTES / 2**20:.0f} MiB")
    salt = json.dumps([teacher_name, schedule.as_dict(), cfg])
    folder = uploads_dir() / published_folder_name(paths, strengths, salt)
    if (folder / MANIFEST).is_file():
        return folder  # the same files, strengths, teacher and schedule were imported before
    try:
        make_published_student(folder, paths, teacher, schedule, strengths, cfg, teacher_id=teacher_name)
    except Exception:
        discard_upload(folder)
        raise
    prune_uploads()
    return folder


def discard_upload(folder: Path) -> None:
    """Remove a rejected upload so it never shows up in the picker."""
    if uploads_dir() in Path(folder).resolve().parents:
        shutil.rmtree(folder, ignore_errors=True)
