"""Phases tab: edit a K-phase schedule (boundaries, steps, shift), see its timesteps, NFE and log-SNR.

The last valid schedule lives in a gr.State that Compare reads, so an invalid edit never breaks Compare.
"""
from __future__ import annotations

import gradio as gr
from PIL import Image

from pdmd.core.schedule import PRESETS, PhaseSchedule, ScheduleError
from ui.images import figure_to_image
from ui.inputs import InputError, bounded_schedule, error_markdown, text

DEFAULT_PRESET = "paper-2x2"
PHASE_COLOURS = ("#cfe2f3", "#fce5cd", "#d9ead3", "#ead1dc", "#fff2cc", "#d0e0e3")


def schedule_fields(schedule: PhaseSchedule) -> tuple[str, str, str]:
    """A schedule as the three text fields of the editor."""
    return (", ".join(f"{b:g}" for b in schedule.boundaries), ", ".join(str(n) for n in schedule.steps),
            f"{schedule.shift:g}")


def plot_schedule(schedule: PhaseSchedule) -> Image.Image:
    """Timestep against step index, with one coloured band per phase and each boundary marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.4))
    edges = schedule.edges
    for k, (top, bottom) in enumerate(zip(edges, edges[1:])):
        axis.axhspan(bottom, top, color=PHASE_COLOURS[k % len(PHASE_COLOURS)], alpha=0.9,
                     label=f"phase {k + 1}: {schedule.steps[k]} step(s)")
    for boundary in schedule.boundaries:
        axis.axhline(boundary, color="black", linestyle="--", linewidth=0.8)
    axis.plot(range(schedule.nfe + 1), schedule.timesteps, marker="o", color="#1f4e79", linewidth=1.5)
    axis.set_xlabel("Euler step")
    axis.set_ylabel("t (noise level, 1 = pure noise)")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlim(-0.2, schedule.nfe + 0.2)
    axis.set_xticks(range(schedule.nfe + 1))
    axis.legend(loc="upper right", fontsize=8)
    axis.set_title(f"{schedule.num_phases} phase(s), shift {schedule.shift:g}, NFE {schedule.nfe}", fontsize=10)
    figure.tight_layout()
    return figure_to_image(figure)


def summary_markdown(schedule: PhaseSchedule) -> str:
    rows = [f"**NFE {schedule.nfe}** (model evaluations per image without CFG) · shift {schedule.shift:g}",
            "", "| boundary | t | log-SNR |", "|---|---|---|"]
    rows += [f"| t_{k + 1} | {t:.4g} | {snr:+.3f} |"
             for k, (t, snr) in enumerate(zip(schedule.boundaries, schedule.boundary_log_snr))]
    if not schedule.boundaries:
        rows.append("| – | one phase: no interior boundary | – |")
    rows += ["", "Timesteps: " + ", ".join(f"{t:.4g}" for t in schedule.timesteps)]
    return "\n".join(rows)



def on_schedule_edit(boundaries: str, steps: str, shift: str, last_valid: dict):
    """Validate the editor's fields. Valid: plot, summary, 'ok' message, new state.
    Invalid: the message names the problem; plot, summary and state stay as they were."""
    try:
        fields = [text(value, what, 200) for value, what in ((boundaries, "boundaries"), (steps, "steps"),
                                                              (shift, "shift"))]
        schedule = bounded_schedule(PhaseSchedule.parse(*fields))
    except (ScheduleError, InputError) as err:
        kept = PhaseSchedule.from_dict(last_valid).describe() if last_valid else "none"
        return (gr.skip(), gr.skip(),
                error_markdown(f"{err}. Compare keeps the last valid schedule ({kept})."), last_valid)
    return (plot_schedule(schedule), summary_markdown(schedule),
            f"✓ {schedule.describe()} — used by Compare.", schedule.as_dict())


def on_preset(name: str):
    """Fill the editor with a preset (the fields' change handler then validates and plots it)."""
    if name not in PRESETS:
        return gr.skip(), gr.skip(), gr.skip(), error_markdown(f"unknown preset {name!r}")
    return (*schedule_fields(PRESETS[name]), "")


def build_phases_tab(schedule_state: gr.State) -> dict:
    boundaries, steps, shift = schedule_fields(PRESETS[DEFAULT_PRESET])
    gr.Markdown("Split the noise range into phases, one LoRA expert each. Boundaries are noise levels "
                "(after the shift), highest first; steps are per phase (one number = every phase).")
    with gr.Row():
        with gr.Column(scale=2):
            preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset")
            boundaries_box = gr.Textbox(boundaries, label="Boundaries t_1 > … > t_{K-1}", elem_id="phases-boundaries")
            steps_box = gr.Textbox(steps, label="Steps per phase", elem_id="phases-steps")
            shift_box = gr.Textbox(shift, label="Shift", elem_id="phases-shift")
            message = gr.Markdown(elem_id="phases-message")
            summary = gr.Markdown()
        with gr.Column(scale=3):
            plot = gr.Image(label="Timestep schedule and phase bands", type="pil", interactive=False,
                            elem_id="phases-plot")
    fields = [boundaries_box, steps_box, shift_box]
    edit_outputs = [plot, summary, message, schedule_state]
    # .change, not .input: it also fires on paste and autofill, and when a preset fills the fields
    for box in fields:
        box.change(on_schedule_edit, [*fields, schedule_state], edit_outputs, show_progress="hidden")
    preset.input(on_preset, preset, [*fields, message])
    return {"fields": fields, "outputs": edit_outputs}
