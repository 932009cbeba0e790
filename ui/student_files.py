"""Student files in and out of Compare: an uploaded student folder, published LoRA files made a student, and a
student's LoRAs exported for diffusers or ComfyUI."""
from __future__ import annotations

import shutil
import uuid

import gradio as gr

from pdmd import limits
from pdmd.core.schedule import ScheduleError
from pdmd.students import lora_formats
from pdmd.teachers import BUILTIN, teacher_key
from ui import students
from ui.comparison import DOWNLOAD_DIR, clean_downloads, student_of
from ui.inputs import USER_ERRORS, InputError, bounded_number, error_markdown, parse_strengths, schedule_of
from ui.models import ModelStore
from ui.teacher_picker import LOAD_ERRORS, teacher_pick


def on_upload(store: ModelStore, files):
    """Import an uploaded student folder, load it once to check its LoRAs fit, and select it."""
    paths = [getattr(f, "name", f) for f in (files or [])]
    try:
        folder = students.import_upload(paths)
        try:
            store.student(folder)
        except LOAD_ERRORS:
            store.forget_student(folder)
            students.discard_upload(folder)
            raise
    except LOAD_ERRORS as err:
        return gr.skip(), error_markdown(f"Upload refused: {err}")
    return (gr.update(choices=students.picker_choices(), value=str(folder)),
            f"✓ Uploaded student loaded as {folder.name}.")


def on_import_published(store: ModelStore, files, teacher, phases_schedule, cfg, *strengths):
    """Published LoRA files (one per phase, in file-name order) + the selected teacher + the Phases tab's
    schedule + one strength per phase (the first as many strength sliders) -> a student folder under
    runs/uploads, selected. Outputs: picker, status."""
    name, options = teacher_pick(teacher)
    paths = [getattr(f, "name", f) for f in (files or [])]
    try:
        schedule = schedule_of(phases_schedule)
        cfg = bounded_number(cfg, "CFG", 0, limits.MAX_CFG)
        folder = students.import_published(paths, store.teacher(name, options), teacher_key(name)[0], schedule,
                                           parse_strengths(strengths, schedule.num_phases), cfg)
        store.student(folder)
    except (InputError, ScheduleError, *LOAD_ERRORS) as err:
        return gr.skip(), error_markdown(f"Published LoRA refused: {err}")
    manifest = store.manifest(folder)
    published, networks = manifest.published, manifest.networks
    placed = "; ".join(f"phase {k + 1} ← {file} × {strength:g}" + (f" → {networks[k]}" if networks else "")
                       for k, (file, strength) in enumerate(zip(published["files"], published["strengths"])))
    return (gr.update(choices=students.picker_choices(name), value=str(folder)),
            f"✓ Published student {folder.name}: {placed}.")


def on_export_student(store: ModelStore, student_value, layout, teacher=BUILTIN):
    """The picked student's per-phase LoRAs as one zip (files + export.json) in the diffusers or ComfyUI layout.
    Outputs: the zip's path for the download button, status."""
    try:
        if student_value == students.BASELINE:
            raise InputError("pick a student to export (the baseline is the teacher itself)")
        folder, _ = student_of(store, student_value, teacher_pick(teacher)[0])
        clean_downloads()
        target = DOWNLOAD_DIR / f"{students.sanitise(students.student_name(folder))}-{layout}-{uuid.uuid4().hex[:8]}"
        written = lora_formats.export_student(folder, target, layout)
    except USER_ERRORS as err:
        return gr.skip(), error_markdown(f"Export refused: {err}")
    archive = shutil.make_archive(str(target), "zip", target)
    shutil.rmtree(target)
    return archive, f"✓ {len(written)} file(s) in the {layout} layout, with export.json naming each file's phase."

