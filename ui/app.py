"""The Blocks a visitor sees: Compare, Phases, Train, Lab."""
from __future__ import annotations

import gradio as gr

from pdmd import limits
from pdmd.core.schedule import PRESETS
from pdmd.paths import ROOT, runs_dir
from pdmd.showcase import Showcase
from pdmd.training.gate import Gate
from pdmd.training.jobs import JobManager
from ui.compare import build_compare_tab
from ui.comparison import clean_downloads
from ui.lab import build_lab_tab
from ui.models import ModelStore
from ui.phases import DEFAULT_PRESET, build_phases_tab, on_schedule_edit
from ui.showcase import ShowcaseStore, build_showcase_tab, load_everything
from ui.train import build_train_tab

TITLE = "Phased DMD Studio"
CSS = ".pdmd-error { color: #b00020; font-weight: 600; }"
INTRO = ("# Phased DMD Studio\nA many-step teacher next to its few-step student — one LoRA expert per noise "
         "phase ([Phased DMD](https://arxiv.org/abs/2510.27684)) — on the built-in 32×32 teacher, on CPU.")


def build_app(store: ModelStore | None = None, manager: JobManager | None = None,
              gate: Gate | None = None, showcase: Showcase | None = None) -> gr.Blocks:
    gate = gate or Gate.from_env()
    showcase = showcase or Showcase.from_env()
    # a public server with a showcase offers exactly its pairs: no Compare tab that could load anything else
    compare = showcase is None or gate.mode == "on"
    store = store or (ModelStore(other_teachers=gate.mode == "on") if compare else None)
    showcase_store = ShowcaseStore(showcase) if showcase else None
    if showcase and showcase.eager:
        load_everything(showcase_store)
    manager = manager or JobManager()  # recovers the jobs a previous app left running
    manager.start_supervisor()
    clean_downloads()
    # gradio's cache (every image and file a handler returned) is emptied of files older than an hour, hourly
    with gr.Blocks(title=TITLE, delete_cache=(limits.DOWNLOAD_MAX_AGE_S, limits.DOWNLOAD_MAX_AGE_S)) as app:
        gr.Markdown(INTRO)
        schedule_state = gr.State(PRESETS[DEFAULT_PRESET].as_dict())
        students_changed = gr.State(0)  # the Train tab bumps it when a job finishes: Compare re-lists students
        with gr.Tabs():
            if showcase:
                with gr.Tab("Showcase", id="showcase"):
                    build_showcase_tab(showcase_store)
            if compare:
                with gr.Tab("Compare", id="compare") as compare_tab:
                    build_compare_tab(store, schedule_state, refresh_on=[compare_tab.select, students_changed.change])
            with gr.Tab("Phases", id="phases"):
                phases = build_phases_tab(schedule_state)
            with gr.Tab("Train", id="train"):
                build_train_tab(manager, gate, schedule_state, students_changed)
            with gr.Tab("Lab", id="lab"):
                build_lab_tab()
        # draw the default schedule once the page opens
        app.load(on_schedule_edit, [*phases["fields"], schedule_state], phases["outputs"])
    return app


def launch_settings() -> dict:
    """What app.py launches with besides host and port. Uploads are bounded twice: gradio's ``max_file_size``
    for every file at its upload route (one limit for the whole app, so the largest thing uploaded: a published
    LoRA), then each use's own limit before the file is opened (a student folder's MAX_UPLOAD_BYTES, a condition
    image's MAX_IMAGE_BYTES and MAX_IMAGE_PIXELS in pdmd.conditions.open_image)."""
    return {"css": CSS, "blocked_paths": blocked_paths(),
            "max_file_size": max(limits.MAX_UPLOAD_BYTES, limits.MAX_PUBLISHED_BYTES, limits.MAX_IMAGE_BYTES)}


def blocked_paths() -> list[str]:
    """Folders gradio must never serve a file from, whatever a request asks: the runs (jobs.sqlite, logs,
    configs, checkpoints, other visitors' uploads) and the repository. What a visitor needs -- sample images,
    the comparison PNG, a student zip -- reaches gradio's own cache as a handler's output, and only from there
    is it served."""
    return [str(runs_dir()), str(ROOT)]
