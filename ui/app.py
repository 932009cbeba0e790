"""The Blocks a visitor sees: Compare, Phases, Train, Lab."""
from __future__ import annotations

import gradio as gr

from pdmd.schedule import PRESETS
from ui import students
from ui.compare import build_compare_tab
from ui.lab import build_lab_tab
from ui.models import ModelStore
from ui.phases import DEFAULT_PRESET, build_phases_tab, on_schedule_edit

TITLE = "Phased DMD Studio"
CSS = ".pdmd-error { color: #b00020; font-weight: 600; }"
INTRO = ("# Phased DMD Studio\nA many-step teacher next to its few-step student — one LoRA expert per noise "
         "phase ([Phased DMD](https://arxiv.org/abs/2510.27684)) — on the built-in 32×32 teacher, on CPU.")
TRAIN_NOTE = ("**Training from the browser arrives with the Train-tab issue.** Until then, distil a student "
              "on the command line — it appears in Compare's student picker when it finishes:\n\n"
              "```bash\npython -m pdmd train --config assets/students/phased/config.yaml\n```")


def build_app(store: ModelStore | None = None) -> gr.Blocks:
    store = store or ModelStore()
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(INTRO)
        schedule_state = gr.State(PRESETS[DEFAULT_PRESET].as_dict())
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(store, schedule_state)
            with gr.Tab("Phases", id="phases"):
                phases = build_phases_tab(schedule_state)
            with gr.Tab("Train", id="train"):
                gr.Markdown(TRAIN_NOTE)
            with gr.Tab("Lab", id="lab"):
                build_lab_tab()
        # draw the default schedule once the page opens
        app.load(on_schedule_edit, [*phases["fields"], schedule_state], phases["outputs"])
    return app


def allowed_paths() -> list[str]:
    """The only folders gradio may serve files from besides its own cache: shipped students and runs."""
    return [str(students.SHIPPED_DIR), str(students.runs_dir())]
