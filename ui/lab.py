"""Lab tab: the 2-D lab (pdmd.lab) at CPU-sized budgets, its scatter plots and metrics table (mean ± std over
seeds when several were run)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from pdmd import lab, limits
from ui.inputs import InputError, bounded_number, error_markdown

MIXTURES = ("ring", "grid")
TABLE_COLUMNS = list(lab.ROW_COLUMNS)
DECIMALS = {key: digits for key, _, digits in lab.SUMMARY_COLUMNS}
DEFAULT_METHODS = ["teacher", "dmd-sgts", "phased"]
# about a minute and a half on one CPU core, and still enough for a phased student that keeps the grid's modes
DEFAULT_ITERS, DEFAULT_BASE_ITERS = 800, 3000
MAX_ITERS, MAX_BASE_ITERS, MAX_SEEDS = 5000, 10_000, 5
# one request's work, all seeds and methods together (a CPU does ~25 generator updates a second)
MAX_TOTAL_UPDATES, MAX_TOTAL_BASE_ITERS = 20_000, 30_000
CAPTION = ("**What to look for.** The 5x5 grid is the hard case: a student that keeps its diversity puts a sharp "
           "dot on each of the 25 modes, like the teacher. Phased DMD should keep all 25 sharp; DMD + SGTS, at "
           "the same budget, drops or merges modes and piles mass on some. Read *modes_covered* (of 25), "
           "*in_modes* (the share of samples within 3 std of a mode; the data's is 0.99) and *mode_kl* (0 = every "
           "mode gets its fair share). With several seeds the table shows mean ± std over them and the plot the "
           "first seed. `python -m pdmd lab --grid --seeds 0-4` runs the full study.")


def lab_config(iters, base_iters, samples) -> lab.LabConfig:
    return lab.LabConfig(iters=bounded_number(iters, "iterations", 1, MAX_ITERS, whole=True),
                         teacher_iters=bounded_number(base_iters, "base fit iterations", 1, MAX_BASE_ITERS,
                                                      whole=True),
                         eval_samples=bounded_number(samples, "samples", 100, 20_000, whole=True))


def check_work(config: lab.LabConfig, students: int, seeds: int) -> None:
    """Bound one request's work: seeds x student methods x iterations, and seeds x base fit iterations."""
    updates = seeds * students * config.iters
    if updates > MAX_TOTAL_UPDATES:
        raise InputError(f"too much work: {seeds} seed(s) x {students} student(s) x {config.iters} iterations = "
                         f"{updates} generator updates, at most {MAX_TOTAL_UPDATES}; lower seeds, methods or "
                         "iterations")
    if seeds * config.teacher_iters > MAX_TOTAL_BASE_ITERS:
        raise InputError(f"too much work: {seeds} seed(s) x {config.teacher_iters} base fit iterations, at most "
                         f"{MAX_TOTAL_BASE_ITERS} in all; lower seeds or base fit iterations")


def on_run_lab(methods, mixture_kind, modes, teacher_kind, iters, base_iters, samples, seed, seeds=1,
               progress=gr.Progress()):
    """Outputs: the scatter plot (first seed), the metrics table (rows; mean ± std text with several seeds),
    a status message."""
    try:
        if not methods or not isinstance(methods, (list, tuple)):
            raise InputError("choose at least one method")
        unknown = [m for m in methods if m not in lab.METHOD_CHOICES]
        if unknown or mixture_kind not in MIXTURES or teacher_kind not in ("exact", "mlp"):
            raise InputError(f"unknown choice {unknown or mixture_kind or teacher_kind!r}")
        modes = bounded_number(modes, "modes", 2, 32, whole=True)
        seeds = bounded_number(seeds, "seeds", 1, MAX_SEEDS, whole=True)
        seed = bounded_number(seed, "seed", 0, limits.MAX_SEED, whole=True)
        if seed + seeds - 1 > limits.MAX_SEED:
            raise InputError(f"seeds {seed} to {seed + seeds - 1} pass the largest seed, {limits.MAX_SEED}")
        config = lab_config(iters, base_iters, samples)
        check_work(config, sum(m != "teacher" for m in methods), seeds)
    except InputError as err:
        return gr.skip(), gr.skip(), error_markdown(str(err))
    mixture = lab.Mixture.grid() if mixture_kind == "grid" else lab.Mixture.ring(modes)
    ordered = [m for m in lab.METHOD_CHOICES if m in methods]
    runs, first_samples = lab.run_lab_seeds(
        ordered, mixture, teacher_kind, list(range(seed, seed + seeds)), config,
        progress=lambda done, total, name: progress(done / total, desc=f"{name} ({done + 1}/{total})"))
    progress(1.0, desc="plotting")
    if seeds == 1:
        table = [[row[c] for c in TABLE_COLUMNS] for row in runs[0]]
        over = f"seed {seed}"
    else:
        table = summary_rows(lab.summarize(runs))
        over = f"mean ± std over seeds {seed}-{seed + seeds - 1} (plot: seed {seed})"
    return (lab_plot(first_samples, runs[0]), table,
            f"✓ {len(ordered)} method(s) on a {mixture.num_modes}-mode {mixture_kind}, {over}.")


def summary_rows(summary: list[dict]) -> list[list]:
    """The table's rows for several seeds: each metric as 'mean ± std'."""
    rows = []
    for entry in summary:
        cells = [lab.cell_text(entry[c]["mean"], entry[c]["std"], DECIMALS[c]) if c in DECIMALS
                 else f"{entry[c]['mean']:g}" for c in TABLE_COLUMNS[1:]]
        rows.append([entry["method"], *cells])
    return rows


def lab_plot(samples_by_method: dict, rows: list[dict]) -> Image.Image:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lab.png"
        lab.plot(samples_by_method, rows, str(path))
        return Image.open(path).convert("RGB")


def build_lab_tab() -> None:
    gr.Markdown(CAPTION, elem_id="lab-caption")
    with gr.Row():
        methods = gr.CheckboxGroup(list(lab.METHOD_CHOICES), value=DEFAULT_METHODS, label="Methods",
                                   elem_id="lab-methods", scale=3)
        mixture = gr.Radio(list(MIXTURES), value="grid", label="Mixture", elem_id="lab-mixture")
        modes = gr.Number(8, label="Modes on the ring", precision=0)
        teacher_kind = gr.Radio(["exact", "mlp"], value="exact", label="Real score")
    with gr.Row():
        iters = gr.Number(DEFAULT_ITERS, label="Generator iterations", precision=0, elem_id="lab-iters")
        base_iters = gr.Number(DEFAULT_BASE_ITERS, label="MLP base fit iterations", precision=0,
                               elem_id="lab-base-iters")
        samples = gr.Number(2000, label="Samples per method", precision=0)
        seed = gr.Number(0, label="First seed", precision=0)
        seeds = gr.Number(1, label=f"Seeds (1-{MAX_SEEDS}; mean ± std when more than 1)", precision=0,
                          elem_id="lab-seeds")
        run_button = gr.Button("Run lab", variant="primary", elem_id="lab-run")
    status = gr.Markdown(elem_id="lab-status")
    plot = gr.Image(label="Data, teacher and students (first seed)", type="pil", interactive=False,
                    elem_id="lab-plot")
    table = gr.Dataframe(headers=TABLE_COLUMNS, label="Metrics (mean ± std over seeds when several were run)",
                         interactive=False, elem_id="lab-table")
    run_button.click(on_run_lab, [methods, mixture, modes, teacher_kind, iters, base_iters, samples, seed, seeds],
                     [plot, table, status], api_name="lab")
