"""Compare tab: the teacher and a few-step student on the same prompt and seed, side by side.

One click runs two events: the student first (it takes a fraction of a second, so its image appears at
once), then the teacher with a progress bar, which also fills the boundary strip, the speed-up and the
downloadable comparison PNG. Handlers are plain functions of their inputs; build_compare_tab wires them.

The teacher is picked at the top (the built-in one, or a diffusers pipeline folder / Hub id typed in); the
student picker lists that teacher's students. A video teacher (Wan) shows its samples as animated GIFs; the
boundary strip and the comparison PNG use their first frames. Published LoRA files (e.g. Wan2.2-Lightning's
high- and low-noise pair) become a student folder under runs/uploads through pdmd.students.lora_formats.
"""
from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
from PIL import Image
from torch import Tensor

from pdmd.builtin.scenes import PromptError, parse_prompt
from pdmd.core.rectified_flow import unshift_time
from pdmd.core.schedule import PhaseSchedule, ScheduleError
from pdmd.media import save_video
from pdmd.students import lora_formats
from pdmd.students.roles import StudentError, read_manifest
from pdmd.teachers import BUILTIN, same_teacher, teacher_key
from pdmd.teachers.base import Teacher, TeacherError
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


USER_ERRORS = (InputError, StudentError, ScheduleError, PromptError, TeacherError)


# --- the teacher ------------------------------------------------------------------------------------------
# offered in the teacher picker besides 'builtin' and the teachers already loaded (each loads from the Hub, or
# from a local folder typed into the box next to the picker)
SUGGESTED_TEACHERS = ("stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-dev",
                      "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Qwen/Qwen-Image")
LOAD_ERRORS = (TeacherError, StudentError, OSError, RuntimeError)  # a folder of any kind can be typed in


def teacher_pick(value) -> tuple[str, dict]:
    """The teacher state -- ``{"name", "options"}``, or a bare name -- as (name, load options)."""
    if isinstance(value, dict):
        return value.get("name") or BUILTIN, dict(value.get("options") or {})
    return value or BUILTIN, {}


def teacher_choices(store: ModelStore) -> list[str]:
    return list(dict.fromkeys([BUILTIN, *store.loaded_teachers(), *SUGGESTED_TEACHERS]))


def load_options(height, width, frames) -> dict:
    """Resolution and frame count for loading a teacher; blank or 0 = the pipeline's own default."""
    options = {}
    for key, value, high in (("height", height, 4096), ("width", width, 4096), ("num_frames", frames, 1024)):
        if value not in (None, "", 0):
            options[key] = bounded_number(value, key.replace("num_", ""), 1, high, whole=True)
    return options


# --- input checks ----------------------------------------------------------------------------------------
def check_prompt(prompt, teacher_name: str = BUILTIN) -> tuple[str, str]:
    """The prompt, stripped, and (for the built-in teacher, which knows a small grammar) a note listing words
    it does not know and ignores."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise InputError("the prompt is empty: describe a scene, e.g. 'a red star on a dark background'")
    if teacher_name != BUILTIN:
        return prompt, ""
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


# --- pictures ----------------------------------------------------------------------------------------------
def still(picture: Tensor, size: int = images.DISPLAY_SIZE) -> Image.Image:
    """An image (3, H, W), or a video's first frame (F, 3, H, W), for display: small outputs enlarged to
    ``size``, large ones kept at their own size."""
    frame = picture[0] if picture.dim() == 4 else picture
    return images.to_pil(frame, max(size, *frame.shape[-2:]) if size == images.DISPLAY_SIZE else size)


def shown(picture: Tensor, label: str) -> Image.Image | str:
    """What the Compare image box shows: the image, or for a video an animated GIF (its file path)."""
    if picture.dim() == 3:
        return still(picture)
    factor = max(1, images.DISPLAY_SIZE // max(picture.shape[-2:]))  # tiny videos enlarged, pixels kept crisp
    picture = picture.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    path = DOWNLOAD_DIR / f"{students.sanitise(label, 'video')}-{uuid.uuid4().hex[:8]}.gif"
    return str(save_video(picture[None], path))


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
    states = [BoundaryState(t, still(teacher.decode(x)[0], images.TILE_SIZE),
                            still(teacher.decode(d)[0], images.TILE_SIZE)) for t, (x, d) in captured.items()]
    return pictures, result.nfe, seconds, states


def student_schedule(student_schedule_: PhaseSchedule, source: str, phases_schedule: dict | None) -> PhaseSchedule:
    if source != FROM_PHASES:
        return student_schedule_
    schedule = PhaseSchedule.from_dict(phases_schedule or {})
    if schedule.num_phases != student_schedule_.num_phases:
        raise InputError(f"the Phases tab's schedule has {schedule.num_phases} phase(s) but this student has "
                         f"{student_schedule_.num_phases} expert(s); pick a matching schedule or 'as trained'")
    return schedule


def student_of(value: str, teacher_name: str) -> Path:
    """The picked student's folder, which must be a student of the picked teacher."""
    folder = students.resolve_student_folder(value)
    manifest = read_manifest(folder)
    if not same_teacher(manifest["teacher"], teacher_name):
        raise InputError(f"{students.student_name(folder)} is a student of {manifest['teacher']!r}, not of the "
                         f"selected teacher {teacher_name!r}: load its teacher first")
    return folder


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
    if manifest.get("method") == lora_formats.PUBLISHED:
        published = manifest.get("published", {})
        return (f"**Published student** ({source}): {schedule.describe()}; CFG {float(manifest.get('cfg', 1.0)):g}; "
                f"files {', '.join(published.get('files', []))} at strengths "
                f"{', '.join(f'{s:g}' for s in published.get('strengths', []))}.")
    return (f"**Student schedule** ({source}): {schedule.describe()}; CFG {float(manifest.get('cfg', 1.0)):g}; "
            f"method {manifest.get('method', '?')}, {manifest.get('steps_trained', '?')} steps trained.")


def run_student_side(store: ModelStore, prompts: list[str], seed: int, value: str, source: str,
                     phases_schedule: dict | None, teacher_cfg: float, teacher=BUILTIN):
    """Sample the picked student (or the baseline); returns (label, schedule, sample_side's result, the
    teacher state the teacher side must use: the student's own teacher at its resolution)."""
    name, options = teacher_pick(teacher)
    if value == students.BASELINE:
        schedule = PhaseSchedule.from_dict(phases_schedule or {})
        entry = store.loaded_teacher(name, options)
        with entry.lock:
            side = sample_side(entry.teacher, prompts, seed, schedule, teacher_cfg)
        return "Baseline (teacher, no distillation)", schedule, side, {"name": name, "options": options}
    folder = student_of(value, name)
    loaded = store.student(folder)
    schedule = student_schedule(loaded.student.schedule, source, phases_schedule)
    # active(None) around the sampling: a student's experts swap merged weights into the network, and a big
    # teacher shares that network with its student, so it must be the plain teacher again afterwards
    with loaded.lock, loaded.student.roles.active(None):
        side = sample_side(loaded.student.roles.teacher, prompts, seed, schedule, loaded.student.cfg,
                           loaded.student.experts)
    manifest = loaded.student.manifest
    own = {"name": manifest["teacher"], "options": manifest.get("teacher_options") or {}}
    return f"Student {students.student_name(folder)}", schedule, side, own


# --- callbacks ---------------------------------------------------------------------------------------------
def on_compare_student(store: ModelStore, prompt, seed, randomise, student_value, source, phases_schedule,
                       teacher_cfg, teacher=BUILTIN):
    """Outputs: student image (a GIF path for video), its caption, the seed used (written back to the seed
    box), status, run state (None when the input is bad)."""
    try:
        prompt, note = check_prompt(prompt, teacher_pick(teacher)[0])
        seed = resolve_seed(seed, randomise)
        cfg = bounded_number(teacher_cfg, "CFG", 0, MAX_CFG)
        label, schedule, (pictures, nfe, seconds, states), own = run_student_side(
            store, [prompt], seed, student_value, source, phases_schedule, cfg, teacher)
    except USER_ERRORS as err:
        return gr.skip(), gr.skip(), gr.skip(), error_markdown(str(err)), None
    caption = f"**{label}** — NFE {nfe}, {seconds:.2f} s, seed {seed}"
    run = {"prompt": prompt, "seed": seed, "label": label, "nfe": nfe, "seconds": seconds, "teacher": own,
           "image": still(pictures[0]), "boundaries": list(schedule.boundaries), "states": states}
    status = f"Student done in {seconds:.2f} s; running the teacher… {note}".strip()
    return shown(pictures[0], label), caption, seed, status, run


def on_compare_teacher(store: ModelStore, run: dict | None, steps, cfg, progress=gr.Progress()):
    """Outputs: teacher image, its caption, speed-up summary, boundary strip, comparison PNG path, status."""
    if not run:  # the student step rejected the input and already said why
        return (gr.skip(),) * 6
    try:
        steps = bounded_number(steps, "teacher steps", 1, MAX_TEACHER_STEPS, whole=True)
        cfg = bounded_number(cfg, "CFG", 0, MAX_CFG)
        entry = store.loaded_teacher(*teacher_pick(run.get("teacher")))
        schedule = teacher_schedule(steps, entry.teacher.default_shift, tuple(run["boundaries"]))
    except USER_ERRORS as err:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), error_markdown(str(err))
    with entry.lock:
        pictures, nfe, seconds, states = sample_side(
            entry.teacher, [run["prompt"]], run["seed"], schedule, cfg,
            on_step=lambda done, total: progress(done / total, desc=f"teacher step {done}/{total}"))
    teacher_run = {"label": f"Teacher ({steps} steps, CFG {cfg:g})", "nfe": nfe, "seconds": seconds,
                   "image": still(pictures[0]), "states": states}
    speedup = seconds / max(run["seconds"], 1e-9)
    summary = (f"### {speedup:.1f}× faster\nStudent NFE {run['nfe']} in {run['seconds']:.2f} s · teacher NFE {nfe} "
               f"in {seconds:.2f} s · {nfe / max(run['nfe'], 1):.0f}× fewer model evaluations · seed {run['seed']}")
    return (shown(pictures[0], "teacher"), f"**{teacher_run['label']}** — NFE {nfe}, {seconds:.2f} s", summary,
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
                 teacher=BUILTIN, progress=gr.Progress()):
    """Outputs: teacher grid, student grid, diversity scores (mean pairwise probe-feature distance)."""
    from pdmd.builtin import metrics

    try:
        if teacher_pick(teacher)[0] != BUILTIN:
            raise InputError("the diversity score uses the metrics probe of the built-in 32×32 scenes; it is "
                             "available for the built-in teacher only")
        prompt, _ = check_prompt(prompt)
        seed = resolve_seed(seed, False)
        count = bounded_number(count, "number of seeds", 2, MAX_DIVERSITY_SEEDS, whole=True)
        steps = bounded_number(steps, "teacher steps", 1, MAX_TEACHER_STEPS, whole=True)
        cfg = bounded_number(cfg, "CFG", 0, MAX_CFG)
        label, _, (student_pictures, *_), _ = run_student_side(
            store, [prompt] * count, seed, student_value, source, phases_schedule, cfg)
    except USER_ERRORS as err:
        return gr.skip(), gr.skip(), error_markdown(str(err))
    teacher = store.teacher(BUILTIN)
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


def on_refresh_students(current: str, teacher=BUILTIN):
    """The student picker re-listed: the baseline and the selected teacher's students."""
    name = teacher_pick(teacher)[0]
    choices = students.picker_choices(name)
    values = [v for _, v in choices]
    return gr.update(choices=choices, value=current if current in values else students.default_choice(name))


def on_load_teacher(store: ModelStore, picked, typed, height=None, width=None, frames=None):
    """Outputs: the teacher state, status, the student picker (that teacher's students), teacher steps and CFG
    sliders (its own defaults), the teacher picker (now listing it). A typed folder or Hub id wins over the
    picker."""
    name = (typed or "").strip() or picked or BUILTIN
    try:
        options = load_options(height, width, frames)
        teacher = store.teacher(name, options)
    except (InputError, *LOAD_ERRORS) as err:
        return (gr.skip(),) + (error_markdown(f"Teacher not loaded: {err}"),) + (gr.skip(),) * 4
    name = teacher_key(name)[0]  # a folder by its full path, as the picker lists it
    size = teacher.options()
    kind = ("built-in 32×32 scenes" if teacher.family is None else
            f"{teacher.family}, {'video' if teacher.is_video else 'images'} {size['height']}×{size['width']}"
            + (f", {size['num_frames']} frames" if "num_frames" in size else ""))
    experts = f"; experts {', '.join(teacher.network_names)}" if teacher.network_names else ""
    status = (f"✓ Teacher **{name}** ({kind}{experts}): {teacher.default_steps} steps, CFG "
              f"{teacher.default_cfg:g} by default.")
    choices = students.picker_choices(name)
    return ({"name": name, "options": options}, status,
            gr.update(choices=choices, value=students.default_choice(name)),
            gr.update(value=min(teacher.default_steps, MAX_TEACHER_STEPS)), gr.update(value=teacher.default_cfg),
            gr.update(choices=teacher_choices(store), value=name))


def on_upload(store: ModelStore, files):
    """Import an uploaded student folder, load it once to check its LoRAs fit, and select it."""
    paths = [getattr(f, "name", f) for f in (files or [])]
    try:
        folder = students.import_upload(paths)
        try:
            store.student(folder)
        except LOAD_ERRORS:
            students.discard_upload(folder)
            raise
    except LOAD_ERRORS as err:
        return gr.skip(), error_markdown(f"Upload refused: {err}")
    return (gr.update(choices=students.picker_choices(), value=str(folder)),
            f"✓ Uploaded student loaded as {folder.name}.")


def parse_strengths(text, phases: int) -> list[float]:
    """'1, 0.8' -> one LoRA strength per phase; blank = 1 for every phase."""
    parts = [p for p in str(text or "").replace(";", ",").split(",") if p.strip()]
    if not parts:
        return [1.0] * phases
    if len(parts) != phases:
        raise InputError(f"{len(parts)} strength(s) for {phases} phase(s): give one per phase, e.g. "
                         f"'{', '.join(['1'] * phases)}'")
    return [bounded_number(p.strip(), "strength", 0, lora_formats.MAX_STRENGTH) for p in parts]


def on_import_published(store: ModelStore, files, teacher, strengths, phases_schedule, cfg):
    """Published LoRA files (one per phase, in file-name order) + the selected teacher + strengths + the
    Phases tab's schedule -> a student folder under runs/uploads, selected. Outputs: picker, status."""
    name, options = teacher_pick(teacher)
    paths = [getattr(f, "name", f) for f in (files or [])]
    try:
        schedule = PhaseSchedule.from_dict(phases_schedule or {})
        cfg = bounded_number(cfg, "CFG", 0, MAX_CFG)
        folder = students.import_published(paths, store.teacher(name, options), teacher_key(name)[0], schedule,
                                           parse_strengths(strengths, schedule.num_phases), cfg)
        store.student(folder)
    except (InputError, ScheduleError, *LOAD_ERRORS) as err:
        return gr.skip(), error_markdown(f"Published LoRA refused: {err}")
    manifest = read_manifest(folder)
    published, experts = manifest["published"], manifest.get("experts")
    placed = "; ".join(f"phase {k + 1} ← {file} × {strength:g}" + (f" → {experts[k]}" if experts else "")
                       for k, (file, strength) in enumerate(zip(published["files"], published["strengths"])))
    return (gr.update(choices=students.picker_choices(name), value=str(folder)),
            f"✓ Published student {folder.name}: {placed}.")


def on_export_student(student_value, layout, teacher=BUILTIN):
    """The picked student's per-phase LoRAs as one zip (files + export.json) in the diffusers or ComfyUI layout.
    Outputs: the zip's path for the download button, status."""
    try:
        if student_value == students.BASELINE:
            raise InputError("pick a student to export (the baseline is the teacher itself)")
        folder = student_of(student_value, teacher_pick(teacher)[0])
        target = DOWNLOAD_DIR / f"{students.sanitise(students.student_name(folder))}-{layout}-{uuid.uuid4().hex[:8]}"
        written = lora_formats.export_student(folder, target, layout)
    except USER_ERRORS as err:
        return gr.skip(), error_markdown(f"Export refused: {err}")
    archive = shutil.make_archive(str(target), "zip", target)
    shutil.rmtree(target)
    return archive, f"✓ {len(written)} file(s) in the {layout} layout, with export.json naming each file's phase."


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


# --- layout ------------------------------------------------------------------------------------------------
def build_compare_tab(store: ModelStore, schedule_state: gr.State, refresh_on=()) -> None:
    """``refresh_on``: more triggers that re-list the students (the tab opening, a training job finishing)."""
    teacher = store.teacher()  # loaded at start-up: the sliders open on its own defaults, the first click is fast
    teacher_steps_default, teacher_cfg_default = teacher.default_steps, teacher.default_cfg
    teacher_state = gr.State({"name": store.default_teacher, "options": {}})
    with gr.Row():
        teacher_picker = gr.Dropdown(teacher_choices(store), value=store.default_teacher, label="Teacher", scale=2,
                                     elem_id="compare-teacher")
        teacher_path = gr.Textbox(label="…or a diffusers pipeline folder / Hub id", scale=3,
                                  placeholder="/models/Wan2.2-T2V-A14B-Diffusers  or  Qwen/Qwen-Image",
                                  elem_id="compare-teacher-path")
        load_button = gr.Button("Load teacher", scale=0, min_width=120, elem_id="compare-load-teacher")
    with gr.Accordion("Teacher resolution (blank = the model's own; smaller renders faster)", open=False):
        with gr.Row():
            height = gr.Number(None, label="Height (px)", precision=0, minimum=0)
            width = gr.Number(None, label="Width (px)", precision=0, minimum=0)
            frames = gr.Number(None, label="Frames (video)", precision=0, minimum=0)
    teacher_status = gr.Markdown(elem_id="compare-teacher-status")
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
    with gr.Accordion("Published LoRA (e.g. Wan2.2-Lightning, Qwen-Image-Lightning) as a student", open=False):
        gr.Markdown("One `.safetensors` file per phase of the **Phases tab's schedule**, in file-name order "
                    "(Lightning's `high_noise_model` then `low_noise_model`), for the **loaded teacher**; diffusers, "
                    "ComfyUI or kohya key layouts. On Wan2.2 A14B each phase's file goes into the expert its "
                    "steps run on: use the wan2.2-lightning preset (boundary 0.87, just below the switch at 0.875).")
        with gr.Row():
            published = gr.File(file_count="multiple", file_types=[".safetensors"], label="LoRA files", scale=3)
            with gr.Column(scale=2):
                strengths = gr.Textbox("", label="Strength per phase", placeholder="1, 1  (blank = 1 each)")
                published_cfg = gr.Number(1.0, label="Student CFG (Lightning: 1)", minimum=0, maximum=MAX_CFG)
                import_button = gr.Button("Import as student")
        published_status = gr.Markdown()
    with gr.Accordion("Export the student's LoRAs (diffusers or ComfyUI)", open=False):
        with gr.Row():
            export_layout = gr.Radio(list(lora_formats.EXPORT_LAYOUTS), value="comfyui", label="Layout")
            export_button = gr.Button("Export")
            export_file = gr.DownloadButton("Download the LoRAs (.zip)")
        export_status = gr.Markdown()

    student_inputs = [prompt, seed, randomise, picker, source, schedule_state, cfg, teacher_state]
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
    gr.on([refresh.click, *refresh_on], on_refresh_students, [picker, teacher_state], picker)
    upload.upload(partial(on_upload, store), upload, [picker, upload_status])
    diversity_button.click(partial(on_diversity, store),
                           [prompt, seed, count, picker, source, schedule_state, steps, cfg, teacher_state],
                           [teacher_grid, student_grid, diversity_text])
    load_button.click(lambda: "Loading the teacher (a large model takes minutes)…", None, teacher_status,
                      queue=False).then(partial(on_load_teacher, store),
                                        [teacher_picker, teacher_path, height, width, frames],
                                        [teacher_state, teacher_status, picker, steps, cfg, teacher_picker])
    export_button.click(on_export_student, [picker, export_layout, teacher_state], [export_file, export_status])
    import_button.click(partial(on_import_published, store),
                        [published, teacher_state, strengths, schedule_state, published_cfg],
                        [picker, published_status])
