"""Lab tab: the 2-D lab (pdmd.lab) with small iteration counts, its scatter plots and metrics table."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from pdmd import lab
from ui.inputs import InputError, bounded_number, error_markdown

MIXTURES = ("ring", "grid")
TABLE_COLUMNS = ["method", "nfe", "modes_covered", "modes_total", "mode_kl", "spread_ratio", "sliced_w", "seconds"]
DEFAULT_METHODS = ["teacher", "dmd", "phased"]
MAX_ITERS = 5000


def lab_config(iters, base_iters, samples) -> lab.LabConfig:
    return lab.LabConfig(iters=bounded_number(iters, "iterations", 1, MAX_ITERS, whole=True),
                         teacher_iters=bounded_number(base_iters, "base fit iterations", 1, MAX_ITERS, whole=True),
                         eval_samples=bounded_number(samples, "samples", 100, 20_000, whole=True))


def on_run_lab(methods, mixture_kind, modes, teacher_kind, iters, base_iters, samples, seed, progress=gr.Progress()):
    """Outputs: the scatter plot, the metrics table (rows), a status message."""
    try:
        if not methods:
            raise InputError("choose at least one method")
        unknown = [m for m in methods if m not in lab.METHOD_CHOICES]
        if unknown or mixture_kind not in MIXTURES or teacher_kind not in ("exact", "mlp"):
            raise InputError(f"unknown choice {unknown or mixture_kind or teacher_kind!r}")
        modes = bounded_number(modes, "modes", 2, 32, whole=True)
        seed = bounded_number(seed, "seed", 0, 2**31 - 1, whole=True)
        config = lab_config(iters, base_iters, samples)
    except InputError as err:
        return gr.skip(), gr.skip(), error_markdown(str(err))
    mixture = lab.Mixture.grid() if mixture_kind == "grid" else lab.Mixture.ring(modes)
    ordered = [m for m in lab.METHOD_CHOICES if m in methods]
    rows, samples_by_method = lab.run_lab(
        ordered, mixture, teacher_kind, seed, config,
        progress=lambda done, total, name: progress(done / total, desc=f"{name} ({done + 1}/{total})"))
    progress(1.0, desc="plotting")
    table = [[row[c] for c in TABLE_COLUMNS] for row in rows]
    return lab_plot(samples_by_method, rows), table, f"✓ {len(rows)} method(s) on a {mixture.num_modes}-mode {mixture_kind}."


def lab_plot(samples_by_method: dict, rows: list[dict]) -> Image.Image:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lab.png"
        lab.plot(samples_by_method, rows, str(path))
        return Image.open(path).convert("RGB")


def build_lab_tab() -> None:
    gr.Markdown("Distil a 2-D Gaussian mixture with each method and see which modes survive. "
                "Small iteration counts run in seconds to a minute on a CPU; `python -m pdmd lab` runs the full study.")
    with gr.Row():
        methods = gr.CheckboxGroup(list(lab.METHOD_CHOICES), value=DEFAULT_METHODS, label="Methods",
                                   elem_id="lab-methods", scale=3)
        mixture = gr.Radio(list(MIXTURES), value="ring", label="Mixture")
        modes = gr.Number(8, label="Modes on the ring", precision=0)
        teacher_kind = gr.Radio(["exact", "mlp"], value="exact", label="Real score")
    with gr.Row():
        iters = gr.Number(200, label="Generator iterations", precision=0, elem_id="lab-iters")
        base_iters = gr.Number(500, label="MLP base fit iterations", precision=0, elem_id="lab-base-iters")
        samples = gr.Number(2000, label="Samples per method", precision=0)
        seed = gr.Number(0, label="Seed", precision=0)
        run_button = gr.Button("Run lab", variant="primary", elem_id="lab-run")
    status = gr.Markdown(elem_id="lab-status")
    plot = gr.Image(label="Data, teacher and students", type="pil", interactive=False, elem_id="lab-plot")
    table = gr.Dataframe(headers=TABLE_COLUMNS, label="Metrics", interactive=False, elem_id="lab-table")
    run_button.click(on_run_lab, [methods, mixture, modes, teacher_kind, iters, base_iters, samples, seed],
                     [plot, table, status], api_name="lab")
