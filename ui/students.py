"""Where students come from: shipped ones in assets/students, finished runs under runs/, and uploads.

Security: a student is only ever loaded from one of these roots (a client can post any string as the
picker's value), uploads accept only .safetensors files plus one manifest.json, within a size limit, and
are written under names the app makes up itself -- never a name or path the client sent.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from pdmd.paths import SHIPPED_STUDENTS as SHIPPED_DIR
from pdmd.paths import runs_dir, uploads_dir
from pdmd.students.roles import LORA_WEIGHT_NAME, MANIFEST, PICKLE_SUFFIXES, StudentError, phase_adapter, read_manifest

BASELINE = "baseline"  # the undistilled teacher run on the student's schedule: a reference, not a student
BASELINE_LABEL = "Baseline: undistilled teacher on the Phases schedule"
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # rank-64 LoRAs of the built-in teacher are a few MB per phase
MAX_PUBLISHED_BYTES = 2 * 1024**3     # a Wan2.2-Lightning rank-64 LoRA of the 14B experts is ~0.6 GB each


def student_roots() -> list[Path]:
    return [SHIPPED_DIR.resolve(), runs_dir()]


@dataclass(frozen=True)
class StudentChoice:
    label: str
    folder: Path


def _describe(folder: Path, kind: str) -> str:
    manifest = json.loads((folder / MANIFEST).read_text())
    schedule = manifest.get("schedule", {})
    name = folder.name if kind == "shipped" else str(folder.relative_to(runs_dir()))
    phases = len(schedule.get("steps", []))
    if manifest.get("method") == "published":  # pdmd.students.lora_formats.PUBLISHED: LoRA files, not a training run
        files = ", ".join(manifest.get("published", {}).get("files", []))
        return f"{kind}: {name} (published LoRA, {phases} phase(s): {files})"
    return (f"{kind}: {name} ({manifest.get('method', '?')}, {phases} phase(s), "
            f"{manifest.get('steps_trained', '?')} steps trained)")


def student_name(folder: Path) -> str:
    """A run's student folder is called 'student': name it after its run instead."""
    return folder.parent.name if folder.name == "student" else folder.name


def discover_students() -> list[StudentChoice]:
    """Every folder holding a manifest.json: shipped students first, then runs (newest first), then uploads."""
    found = []
    if SHIPPED_DIR.is_dir():
        found += [StudentChoice(_safe_describe(m.parent, "shipped"), m.parent)
                  for m in sorted(SHIPPED_DIR.rglob(MANIFEST))]
    runs = runs_dir()
    if runs.is_dir():
        manifests = [m for m in runs.rglob(MANIFEST) if uploads_dir() not in m.parents]
        found += [StudentChoice(_safe_describe(m.parent, "run"), m.parent)
                  for m in sorted(manifests, key=lambda m: m.stat().st_mtime, reverse=True)]
        if uploads_dir().is_dir():
            found += [StudentChoice(_safe_describe(m.parent, "upload"), m.parent)
                      for m in sorted(uploads_dir().glob(f"*/{MANIFEST}"))]
    return found


def _safe_describe(folder: Path, kind: str) -> str:
    # a broken manifest must not hide the other students; loading it later names the problem
    try:
        return _describe(folder, kind)
    except (OSError, ValueError, AttributeError):
        return f"{kind}: {folder.name} (unreadable manifest)"


def default_choice(teacher: str | None = None) -> str:
    """The app opens on the shipped phased student (the method's story); another teacher opens on its newest
    student; else the baseline."""
    phased = SHIPPED_DIR / "phased"
    if teacher in (None, "builtin"):
        return str(phased) if (phased / MANIFEST).is_file() else BASELINE
    own = picker_choices(teacher)[1:]
    return own[0][1] if own else BASELINE


def teacher_of(folder: Path) -> str | None:
    """The teacher a student folder's manifest names (None when unreadable: loading it names the problem)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("teacher")
    except (OSError, ValueError, AttributeError):
        return None


def picker_choices(teacher: str | None = None) -> list[tuple[str, str]]:
    """The baseline and every student, or only the students of ``teacher`` (unreadable ones always show)."""
    from pdmd.teachers import same_teacher

    found = [c for c in discover_students()
             if teacher is None or (t := teacher_of(c.folder)) is None or same_teacher(t, teacher)]
    return [(BASELINE_LABEL, BASELINE)] + [(c.label, str(c.folder)) for c in found]


def resolve_student_folder(value: str) -> Path:
    """The picker's value -> a student folder inside one of the app's own roots, or StudentError."""
    if not value:
        raise StudentError("pick a student (or the baseline)")
    folder = Path(value).resolve()
    if not any(root == folder or root in folder.parents for root in student_roots()):
        raise StudentError(f"{value!r} is not one of the app's student folders")
    return folder


# --- uploads -----------------------------------------------------------------------------------------------
def sanitise(name: str, fallback: str = "student") -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:40]
    return cleaned or fallback


def _check_upload_files(paths: list[Path]) -> tuple[Path, list[Path]]:
    if not paths:
        raise StudentError("no files uploaded: choose the student folder (manifest.json + phase_k/*.safetensors)")
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
    if total > MAX_UPLOAD_BYTES:
        raise StudentError(f"upload is {total / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MiB")
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
    """Copy an uploaded student into runs/uploads/<name>-<hash>/ in the standard layout and return it."""
    manifest_path, weights = _check_upload_files([Path(p) for p in paths])
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise StudentError(f"{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("phases"), list):
        raise StudentError(f"{MANIFEST} has no 'phases' list")
    phases = len(manifest["phases"])
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
    folder = uploads_dir() / f"{sanitise(str(manifest.get('method', 'student')))}-{digest.hexdigest()[:10]}"
    manifest["phases"] = [f"{phase_adapter(k)}/{LORA_WEIGHT_NAME}" for k in range(phases)]
    for k in range(phases):
        (folder / phase_adapter(k)).mkdir(parents=True, exist_ok=True)
        (folder / manifest["phases"][k]).write_bytes(by_phase[k].read_bytes())
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    try:
        read_manifest(folder)  # the library's own checks, before anyone picks it
    except StudentError:
        discard_upload(folder)
        raise
    return folder


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
    if total > MAX_PUBLISHED_BYTES:
        raise StudentError(f"upload is {total / 2**20:.1f} MiB; the limit is {MAX_PUBLISHED_BYTES / 2**20:.0f} MiB")
    salt = json.dumps([teacher_name, schedule.as_dict(), cfg])
    folder = uploads_dir() / published_folder_name(paths, strengths, salt)
    if (folder / MANIFEST).is_file():
        return folder  # the same files, strengths, teacher and schedule were imported before
    try:
        make_published_student(folder, paths, teacher, schedule, strengths, cfg, teacher_id=teacher_name)
    except Exception:
        discard_upload(folder)
        raise
    return folder


def discard_upload(folder: Path) -> None:
    """Remove a rejected upload so it never shows up in the picker."""
    if uploads_dir() in Path(folder).resolve().parents:
        shutil.rmtree(folder, ignore_errors=True)
