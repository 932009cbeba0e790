"""The Train tab's finished-student row: its model card (README.md) to download, and -- only while training is
open on this server (PDMD_TRAINING=on) -- a push of the student to the Hub (pdmd.commands.push)."""
from __future__ import annotations

import shutil
from functools import partial

import gradio as gr

from pdmd.commands.push import PushError, push_student
from pdmd.students.card import CARD, write_card
from pdmd.training.gate import Gate
from pdmd.training.jobs import JobManager
from ui.comparison import DOWNLOAD_DIR
from ui.inputs import error_markdown, text


def finished_job(manager: JobManager, job_id):
    job = next((j for j in manager.jobs() if j.id == job_id), None)
    if job is None or not job.finished or not job.run.has_student():
        raise PushError("pick a finished job: only a finished job has a student")
    return job


def on_card(manager: JobManager, job_id):
    """Outputs: the card's path for the download button, status."""
    try:
        job = finished_job(manager, job_id)
    except PushError as err:
        return gr.skip(), error_markdown(str(err))
    card = job.student / CARD
    if not card.is_file():  # a student trained before cards existed
        write_card(job.student, seconds=job.run.training_seconds(), sample_grid=job.run.latest_sample)
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    target = DOWNLOAD_DIR / f"{job.name}-README.md"
    shutil.copyfile(card, target)
    return str(target), f"✓ Model card of {job.name}."


def on_push(manager: JobManager, gate: Gate, job_id, repo, private) -> str:
    if gate.mode != "on":  # checked here too: the API reaches this handler whatever the page shows
        return error_markdown("pushing to the Hub is only possible where training is open (PDMD_TRAINING=on)")
    try:
        job = finished_job(manager, job_id)
        url = push_student(job.student, text(repo, "repository", 200).strip(), bool(private))
    except (PushError, ValueError) as err:
        return error_markdown(f"Push refused: {err}")
    return f"✓ Pushed {job.name}: {url}"


def build_publish_row(manager: JobManager, gate: Gate, job: gr.Dropdown) -> None:
    with gr.Row():
        card_button = gr.Button("Model card (README.md)", scale=0, elem_id="train-card")
        card_file = gr.DownloadButton("Download card", visible=True, scale=0, elem_id="train-card-download")
        if gate.mode == "on":
            repo = gr.Textbox(label="Hub repository (OWNER/NAME)", scale=2, elem_id="train-push-repo")
            private = gr.Checkbox(True, label="Private", scale=0)
            push = gr.Button("Push to the Hub", scale=0, elem_id="train-push")
    status = gr.Markdown(elem_id="train-publish-status")
    card_button.click(partial(on_card, manager), job, [card_file, status])
    if gate.mode == "on":
        push.click(partial(on_push, manager, gate), [job, repo, private], status)
