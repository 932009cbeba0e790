"""Compare tab: the teacher and a few-step student on the same prompt and seed, side by side.

One click runs two events: the student first (it takes a fraction of a second, so its image appears at
once), then the teacher with a progress bar, which also fills the boundary strip, the speed-up and the
downloadable comparison PNG. Handlers are plain functions of their inputs; build_compare_tab wires them.
"""
from __future__ import annotations

import math
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
from PIL import Image

from pdmd.experts import StudentError, read_manifest
from pdmd.rectified_flow import unshift_time
from pdmd.scenes import PromptError, parse_prompt
from pdmd.schedule import PhaseSchedule, ScheduleError
from pdmd.teachers.base import Teacher
from ui import images, students
from ui.models import ModelStore
from ui.phases import error_markdown

MAX_SEED = 2**31 - 1
MAX_TEACHER_STEPS = 200
MAX_CFG = 20.0
MAX_DIVERSITY_SEEDS = 16
EXAMPLES = [
    ["a red star on a dark background", 0],
    ["a blue circle on a light background", 7],
    ["a yellow triangle on a sky background", 42],
    ["a green square on a grey background", 3],
]
AS_TRAINED, FROM_PHASES = "as trained", "from the Phases tab"
DOWNLOAD_DIR = Path(tempfile.gettempdir()) / "pdmd-app"


class InputError(ValueError):
    """A form value the app cannot use; the message says which and why."""


USER_ERRORS = (InputError, StudentError, ScheduleError, PromptError)


# --- input checks ----------------------------------------------------------------------------------------
def check_prompt(prompt) -> tuple[str, str]:
    """The prompt, stripped, and a note listing words the built-in teacher does not know (it ignores them)."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise InputError("the prompt is empty: describe a scene, e.g. 'a red star on a dark background'")
    unknown = parse_prompt(prompt).unknown  # raises PromptError for "a red blue star"
    return prompt, (f"Unknown word(s) ignored: {', '.join(unknown)}." if unknown else "")


def bounded_number(value, what: str, low: float, high: float, whole: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InputError(f"{what} {value!r} must lie between {low:g} and {high:g}")
    if whole and number != int(number):
        raise InputError(f"{what} {value!r} must be a whole number")
    return int(number) if whole else number


def resolve_seed(seed, randomise: bool) -> int:
    if randomise:
        return random.randint(0, MAX_SEED)
    return bounded_number(seed, "seed", 0, MAX_SEED, whole=True)


def teacher_schedule(steps: int, shift: float, boundaries: tuple[float, ...]) -> PhaseSchedule:
    """The teacher's own N-step grid, split at the student's boundaries so the teacher has a state at each
    boundary t: steps go to phases in proportion to their length in unshifted time (largest remainder)."""
    if steps < len(boundaries) + 1:
        raise InputError(f"teacher steps {steps} must be at least {len(boundaries) + 1} "
                         "so that every student boundary is a teacher step")
    edges = [unshift_time(t, shift) for t in (1.0, *boundaries, 0.0)]
    shares = [(top - bottom) * steps for top, bottom in zip(edges, edges[1:])]
    counts = [max(1, math.floor(s)) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda k: shares[k] - math.floor(shares[k]), reverse=True)
    for k in by_remainder[: max(0, steps - sum(counts))]:
        counts[k] += 1
    while sum(counts) > steps:  # phases raised to one step are paid for by the longest
        counts[counts.index(max(counts))] -= 1
    return PhaseSchedule(tuple(boundaries), tuple(counts), shift)


# --- sampling ----------------------------------------------------------------------------------------------
@dataclass
class BoundaryState:
    t: float
    state: Image.Image     # x_t decoded
    denoised: Image.Image  # the model's x_0 prediction from x_t


def sample_side(teacher: Teacher, prompts: list[str], seed: int, schedule: PhaseSchedule, cfg: float,
                experts=None, on_step=None):
    """Images, NFE, wall seconds (sampling + decoding) and the state at every interior boundary."""
    captured = {}

    def record(step: dict):
        for t in schedule.boundaries:
            if math.isclose(step["sigma"], t, abs_tol=1e-9):
                captured[t] = (step["x"][:1], step["denoised"][:1])
        if on_step is not None:
            on_step(step["i"] + 1, schedule.nfe)

    start = time.perf_counter()
    result = teacher.sample(prompts, seed, schedule, cfg, experts, callback=record)
    pictures = teacher.decode(result.sample)
    seconds = time.perf_counter() - start
    states = [BoundaryState(t, images.to_pil(teacher.decode(x)[0], images.TILE_SIZE),
                            images.to_pil(teacher.decode(d)[0], images.TILE_SIZE)) for t, (x, d) in captured.items()]
    return pictures, result.nfe, seconds, states


def student_schedule(student_schedule_: PhaseSchedule, source: str, phases_schedule: dict | None) -> PhaseSchedule:
    if source != FROM_PHASES:
        return student_schedule_
    schedule = PhaseSchedule.from_dict(phases_schedule or {})
    if schedule.num_phases != student_schedule_.num_phases:
        raise InputError(f"the Phases tab's schedule has {schedule.num_phases} phase(s) but this student has "
                         f"{student_schedule_.num_phases} expert(s); pick a matching schedule or 'as trained'")
    return schedule


def describe_student(value: str, source: str, phases_schedule: dict | None) -> str:
    """Markdown: which schedule the picked student will run (boundaries, steps per phase, shift)."""
    try:
        if value == students.BASELINE:
            schedule = PhaseSchedule.from_dict(phases_schedule or {})
            return f"**Baseline schedule** (Phases tab): {schedule.describe()}; the teacher's CFG."
        manifest = read_manifest(students.resolve_student_folder(value))
        trained = PhaseSchedule.from_dict(manifest["schedule"])
        schedule = student_schedule(trained, source, phases_schedule)
    except USER_ERRORS as err:
        return error_markdown(str(err))
    return (f"**Student schedule** ({source}): {schedule.describe()}; CFG {float(manifest.get('cfg', 1.0)):g}; "
            f"method {manifest.get('method', '?')}, {manifest.get('steps_trained', '?')} steps trained.")


def run_student_side(store: ModelStore, prompts: list[str], seed: int, value: str, source: str,
                     phases_schedule: dict | None, teacher_cfg: float):
    """Sample the picked student (or the baseline); returns (label, schedule, sample_side's result)."""
    if value == students.BASELINE:
        schedule = PhaseSchedule.from_dict(phases_schedule or {})
        return "Baseline (teacher, no distillation)", schedule, sample_side(
            store.teacher(), prompts, seed, schedule, teacher_cfg)
    folder = students.resolve_student_folder(value)
    loaded = store.student(folder)
    schedule = student_schedule(loaded.student.schedule, source, phases_schedule)
    with loaded.lock:
        side = sample_side(loaded.student.roles.teacher, prompts, seed, schedule, loaded.student.cfg,
                           loaded.student.experts)
    return f"Student {students.student_name(folder)}", schedule, side


# --- callbacks ---------------------------------------------------------------------------------------------
def on_compare_student(store: ModelStore, prompt, seed, randomise, student_value, source, phases_schedule,
                       teacher_cfg):
    """Outputs: student image, its caption, the seed used (written back to the seed box), status, run state
    (None when the input is bad)."""
    try:
        prompt, note = check_prompt(prompt)
        seed = resolve_seed(seed, randomise)
        cfg = bounded_number(teacher_cfg, "CFG", 0, MAX_CFG)
        label, schedule, (pictures, nfe, seconds, states) = run_student_side(
            store, [prompt], seed, student_value, source, phases_schedule, cfg)
    except USER_ERRORS as err:
        return gr.skip(), gr.skip(), gr.skip(), error_markdown(str(err)), None
    caption = f"**{label}** — NFE {nfe}, {seconds:.2f} s, seed {seed}"
    run = {"prompt": prompt, "seed": seed, "label": label, "nfe": nfe, "seconds": seconds,
           "image": images.to_pil(pictures[0]), "boundaries": list(schedule.boundaries), "states": states}
    status = f"Student done in {seconds:.2f} s; running the teacher… {note}".strip()
    return run["image"], caption, seed, status, run


def on_compare_teacher(store: ModelStore, run: dict | None, steps, cfg, progress=gr.Progress()):
    """Outputs: teacher image, its caption, speed-up summary, boundary strip, comparison PNG path, status."""
    if not run:  # the student step rejected the input and already said why
        return (gr.skip(),) * 6
    try:
        steps = bounded_number(steps, "teacher steps", 1, MAX_TEACHER_STEPS, whole=True)
        cfg = bounded_number(cfg, "CFG", 0, MAX_CFG)
        teacher = store.teacher()
        schedule = teacher_schedule(steps, teacher.default_shift, tuple(run["boundaries"]))
    except USER_ERRORS as err:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), error_markdown(str(err))
    pictures, nfe, seconds, states = sample_side(
        teacher, [run["prompt"]], run["seed"], schedule, cfg,
        on_step=lambda done, total: progress(done / total, desc=f"teacher step {done}/{total}"))
    teacher_run = {"label": f"Teacher ({steps} steps, CFG {cfg:g})", "nfe": nfe, "seconds": seconds,
                   "image": images.to_pil(pictures[0]), "states": states}
    speedup = seconds / max(run["seconds"], 1e-9)
    summary = (f"### {speedup:.1f}× faster\nStudent NFE {run['nfe']} in {run['seconds']:.2f} s · teacher NFE {nfe} "
               f"in {seconds:.2f} s · {nfe / max(run['nfe'], 1):.0f}× fewer model evaluations · seed {run['seed']}")
    return (teacher_run["image"], f"**{teacher_run['label']}** — NFE {nfe}, {seconds:.2f} s", summary,
            boundary_strip(run, teacher_run), comparison_png(run, teacher_run), "Done.")


def boundary_strip(student_run: dict, teacher_run: dict) -> Image.Image:
    """Student x_t and x_0-prediction at each boundary over the teacher's at the same t."""
    if not student_run["states"]:
        return images.text_block(["One-phase schedule: no interior boundary to compare."], 520)
    by_t = {s.t: s for s in teacher_run["states"]}
    rows = [(f"boundary t = {s.t:g}", [s.state, s.denoised, by_t[s.t].state, by_t[s.t].denoised])
            for s in student_run["states"]]
    return images.labelled_grid(rows, ["student x_t", "student x0 pred.", "teacher x_t", "teacher x0 pred."])


def comparison_png(student_run: dict, teacher_run: dict) -> str:
    """One labelled PNG for slides: prompt and seed, each side with its NFE and time, the speed-up."""
    speedup = teacher_run["seconds"] / max(student_run["seconds"], 1e-9)
    sides = [images.captioned(side["image"], [side["label"], f"NFE {side['nfe']}, {side['seconds']:.2f} s"])
             for side in (teacher_run, student_run)]
    body = images.stack_horizontally(sides, gap=16)
    header = images.text_block([f"\"{student_run['prompt']}\"  seed {student_run['seed']}"], body.width, 17)
    footer = images.text_block([f"speed-up {speedup:.1f}x  ·  Phased DMD Studio"], body.width)
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    path = DOWNLOAD_DIR / f"comparison-seed{student_run['seed']}-{uuid.uuid4().hex[:8]}.png"
    images.stack_vertically([header, body, footer]).save(path)
    return str(path)


def on_diversity(store: ModelStore, prompt, seed, count, student_value, source, phases_schedule, steps, cfg,
                 progress=gr.Progress()):
    """Outputs: teacher grid, student grid, diversity scores (mean pairwise probe-feature distance)."""
    from pdmd import metrics

    try:
        prompt, _ = check_prompt(prompt)
        seed = resolve_seed(seed, False)
        count = bounded_number(count, "number of seeds", 2, MAX_DIVERSITY_SEEDS, whole=True)
        steps = bounded_number(steps, "teacher steps", 1, MAX_TEACHER_STEPS, whole=True)
        cfg = bounded_number(cfg, "CFG", 0, MAX_CFG)
        label, _, (student_pictures, *_) = run_student_side(
            store, [prompt] * count, seed, student_value, source, phases_schedule, cfg)
    except USER_ERRORS as err:
        return gr.skip(), gr.skip(), error_markdown(str(err))
    teacher = store.teacher()
    teacher_pictures, *_ = sample_side(
        teacher, [prompt] * count, seed, PhaseSchedule.uniform(steps, teacher.default_shift), cfg,
        on_step=lambda done, total: progress(done / total, desc=f"teacher step {done}/{total}"))
    probe = store.probe()
    scores = [metrics.feature_diversity([metrics.probe_outputs(probe, p)["features"]])
              for p in (teacher_pictures, student_pictures)]
    grids = [images.image_grid([images.to_pil(p, images.TILE_SIZE) for p in pictures], columns=4)
             for pictures in (teacher_pictures, student_pictures)]
    text = (f"**Diversity** (mean pairwise distance of probe features over {count} seeds; higher = more varied): "
            f"teacher **{scores[0]:.3f}**, {label.lower()} **{scores[1]:.3f}** "
            f"({scores[1] / max(scores[0], 1e-9):.0%} of the teacher's).")
    return grids[0], grids[1], text


def on_refresh_students(current: str):
    choices = students.picker_choices()
    values = [v for _, v in choices]
    return gr.update(choices=choices, value=current if current in values else students.default_choice())


def on_upload(store: ModelStore, files):
    """Import an uploaded student folder, load it once to check its LoRAs fit, and select it."""
    paths = [getattr(f, "name", f) for f in (files or [])]
    try:
        folder = students.import_upload(paths)
        try:
            store.student(folder)
        except StudentError:
            students.discard_upload(folder)
            raise
    except StudentError as err:
        return gr.skip(), error_markdown(f"Upload refused: {err}")
    return (gr.update(choices=students.picker_choices(), value=str(folder)),
            f"✓ Uploaded student loaded as {folder.name}.")


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


# --- layout ------------------------------------------------------------------------------------------------
def build_compare_tab(store: ModelStore, schedule_state: gr.State, refresh_on=()) -> None:
    """``refresh_on``: more triggers that re-list the students (the tab opening, a training job finishing)."""
    teacher = store.teacher()  # loaded at start-up: the sliders open on its own defaults, the first click is fast
    teacher_steps_default, teacher_cfg_default = teacher.default_steps, teacher.default_cfg
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(EXAMPLES[0][0], label="Prompt", elem_id="compare-prompt",
                                info="colour, shape and background, e.g. 'a purple star on a sky background'")
            with gr.Row():
                seed = gr.Number(0, label="Seed (shows the seed used)", precision=0, minimum=0, maximum=MAX_SEED,
                                 elem_id="compare-seed")
                randomise = gr.Checkbox(False, label="Randomise seed")
            with gr.Row():
                steps = gr.Slider(4, 100, teacher_steps_default, step=1, label="Teacher steps")
                cfg = gr.Slider(1.0, 8.0, teacher_cfg_default, step=0.5, label="Teacher CFG")
            with gr.Row():
                picker = gr.Dropdown(students.picker_choices(), value=students.default_choice(), label="Student",
                                     scale=4, elem_id="compare-student")
                refresh = gr.Button("↻", scale=0, min_width=40)
            source = gr.Radio([AS_TRAINED, FROM_PHASES], value=AS_TRAINED, label="Student schedule")
            schedule_info = gr.Markdown(elem_id="compare-schedule")
            run_button = gr.Button("Run comparison", variant="primary", elem_id="compare-run")
            status = gr.Markdown(elem_id="compare-status")
            examples = gr.Examples(EXAMPLES, [prompt, seed], label="One-click examples")
        with gr.Column(scale=3):
            summary = gr.Markdown(elem_id="compare-summary")
            with gr.Row():
                with gr.Column():
                    teacher_image = gr.Image(label="Teacher", type="pil", interactive=False, elem_id="teacher-image")
                    teacher_caption = gr.Markdown(elem_id="teacher-caption")
                with gr.Column():
                    student_image = gr.Image(label="Student", type="pil", interactive=False, elem_id="student-image")
                    student_caption = gr.Markdown(elem_id="student-caption")
            download = gr.DownloadButton("Download comparison", elem_id="compare-download")
    gr.Markdown("#### Boundary states: the student's x_t at each phase boundary next to the teacher's at the same t")
    strip = gr.Image(type="pil", interactive=False, show_label=False, elem_id="boundary-strip")
    with gr.Accordion("Diversity: N seeds for both", open=False):
        with gr.Row():
            count = gr.Slider(2, MAX_DIVERSITY_SEEDS, 8, step=1, label="Seeds")
            diversity_button = gr.Button("Run diversity")
        diversity_text = gr.Markdown()
        with gr.Row():
            teacher_grid = gr.Image(label="Teacher", type="pil", interactive=False)
            student_grid = gr.Image(label="Student", type="pil", interactive=False)
    with gr.Accordion("Upload a student folder (manifest.json + .safetensors only)", open=False):
        upload = gr.File(file_count="multiple", file_types=[".safetensors", ".json"], label="Student files")
        upload_status = gr.Markdown()

    student_inputs = [prompt, seed, randomise, picker, source, schedule_state, cfg]
    student_outputs = [student_image, student_caption, seed, status, gr.State()]
    run_state = student_outputs[-1]
    teacher_outputs = [teacher_image, teacher_caption, summary, strip, download, status]

    def chain(event, api: bool):
        event.then(partial(on_compare_student, store), student_inputs, student_outputs,
                   api_name="compare_student" if api else False).then(
            partial(on_compare_teacher, store), [run_state, steps, cfg], teacher_outputs,
            api_name="compare_teacher" if api else False)

    chain(run_button.click(lambda: "Running the student…", None, status, queue=False), api=True)
    chain(examples.load_input_event.then(lambda: False, None, randomise), api=False)

    describe_inputs = [picker, source, schedule_state]
    for trigger in (picker.change, source.change, schedule_state.change):
        trigger(describe_student, describe_inputs, schedule_info, show_progress="hidden")
    gr.on([refresh.click, *refresh_on], on_refresh_students, picker, picker)
    upload.upload(partial(on_upload, store), upload, [picker, upload_status])
    diversity_button.click(partial(on_diversity, store),
                           [prompt, seed, count, picker, source, schedule_state, steps, cfg],
                           [teacher_grid, student_grid, diversity_text])
