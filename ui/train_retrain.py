"""The Train tab's "retrain from phase K": pick a student the app serves (a shipped one or a finished job's) and
the phase K to train from; the job keeps its experts 1..K-1 (``python -m pdmd train --from-student DIR
--start-phase K``). The JobManager checks the request again: the picker's value is whatever a client sends."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students import StudentError
from pdmd.students.manifest import Manifest
from pdmd.training.from_student import student_name
from pdmd.training.jobs import JobManager


def _served_phases(manager: JobManager) -> dict[str, int]:
    """Folder -> phases of every served student with an earlier expert to keep (two phases or more)."""
    found = {}
    for folder in manager.students():
        try:
            phases = Manifest.read(folder).schedule.num_phases
        except (StudentError, OSError):
            continue  # a folder being written or broken: not offered
        if phases >= 2:
            found[str(folder)] = phases
    return found


def retrain_choices(manager: JobManager) -> list[tuple[str, str]]:
    shipped = SHIPPED_STUDENTS.resolve()
    return [(f"{'shipped' if Path(folder).parent == shipped else 'job'}: {student_name(Path(folder))} "
             f"({phases} phases)", folder) for folder, phases in _served_phases(manager).items()]


def on_relist(manager: JobManager) -> dict:
    return gr.update(choices=retrain_choices(manager))


def on_student(manager: JobManager, folder) -> dict:
    """The K dropdown for the picked student: 2..its phases (empty for anything else)."""
    phases = _served_phases(manager).get(folder) if isinstance(folder, str) else None
    if phases is None:
        return gr.update(choices=[], value=None)
    return gr.update(choices=list(range(2, phases + 1)), value=2)


def build_retrain_row(manager: JobManager, usable: bool, students_changed: gr.State):
    """The student and phase pickers and the button; returns (student, start_phase, button)."""
    with gr.Accordion("Retrain from phase K", open=False):
        gr.Markdown("Keeps the picked student's experts before phase K and trains phases K on with the form "
                    "above as the config: its teacher, LoRA and schedule up to K must be the student's.")
        with gr.Row():
            student = gr.Dropdown(retrain_choices(manager), value=None, label="Student", scale=3,
                                  elem_id="train-retrain-student")
            start_phase = gr.Dropdown([], value=None, label="From phase K", scale=1, elem_id="train-retrain-phase")
            button = gr.Button("Retrain from phase K", scale=1, elem_id="train-retrain", interactive=usable)
    # re-listed when opened and when a job finishes: a page opened long ago still offers the new students
    student.focus(partial(on_relist, manager), None, student, concurrency_limit=None, show_progress="hidden")
    students_changed.change(partial(on_relist, manager), None, student, show_progress="hidden")
    student.change(partial(on_student, manager), student, start_phase, show_progress="hidden")
    return student, start_phase, button
