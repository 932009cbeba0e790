"""The Showcase tab: the owner's teacher/student pairs (pdmd.showcase), the same prompt and seed on both sides.

A visitor picks a pair by name, never a path or Hub id: every handler resolves the name through the showcase
and ShowcaseStore refuses to load any other teacher or student folder, so the API is held to the same list as
the dropdown. Video teachers (Wan) show playable mp4s (GIF only when no mp4 writer is installed), image teachers
a before/after slider next to the side-by-side view; each side is captioned with its NFE and wall time. A
published student (LoRA files) has one strength slider per phase; each strength set is its own student folder
under runs/showcase, the newest SHOWCASE_STRENGTH_VARIANTS kept. A pair whose teacher takes an image
(image-to-video, editing) shows an image input under the prompt, both sides sampling on it; examples may carry
an image.
"""
from __future__ import annotations

import inspect
import json
import shutil
from functools import partial
from pathlib import Path

import gradio as gr

from pdmd import limits
from pdmd.paths import runs_dir
from pdmd.showcase import Showcase, ShowcaseError, ShowcaseStudent, ShowcaseTeacher
from pdmd.students.lora_formats import make_published_student, published_folder_name
from pdmd.students.manifest import MANIFEST, Manifest
from pdmd.teachers import teacher_key
from pdmd.teachers.base import TeacherError
from ui.comparison import (
    before_after,
    image_input,
    media,
    sample_side,
    side_views,
    still,
    strength_sliders,
    strength_updates,
    student_side,
    teacher_schedule,
    teacher_side,
)
from ui.inputs import (
    USER_ERRORS,
    InputError,
    bounded_number,
    check_prompt,
    condition_image,
    error_markdown,
    parse_strengths,
    resolve_seed,
)
from ui.models import ModelStore
from ui.teacher_picker import LOAD_ERRORS

ERRORS = (ShowcaseError, *USER_ERRORS, *LOAD_ERRORS)


def published_dir() -> Path:
    return runs_dir() / "showcase"


class ShowcaseStore(ModelStore):
    """A ModelStore that loads only the showcase's teachers and students. A teacher always loads with the
    showcase's options (dtype, offload, resolution): both sides of a pair share that one network."""

    def __init__(self, showcase: Showcase):
        super().__init__(teacher_name=showcase.teachers[0].model, other_teachers=True)
        self.showcase = showcase
        self._options = {t.key: t.options for t in showcase.teachers}

    def loaded_teacher(self, name=None, options=None):
        key = teacher_key(name or self.default_teacher)[0]
        if key not in self._options:
            raise TeacherError("this server shows only its showcase's teachers")
        return super().loaded_teacher(key, self._options[key])

    def manifest(self, folder: Path) -> Manifest:
        folder = Path(folder).resolve()
        if folder not in self.showcase.student_folders() and published_dir().resolve() not in folder.parents:
            raise InputError("this server shows only its showcase's students")
        return super().manifest(folder)

    def is_loaded(self, teacher: ShowcaseTeacher) -> bool:
        return teacher.key in self.loaded_teachers()


# --- preparing a pair ----------------------------------------------------------------------------------------
def student_folder(store: ShowcaseStore, teacher: ShowcaseTeacher, student: ShowcaseStudent,
                   strengths: list[float] | None = None) -> Path:
    """The student's folder: its own, or (published LoRA files) the one made at ``strengths``."""
    if not student.is_published:
        if not (student.folder / MANIFEST).is_file():
            raise InputError(f"student {student.name!r} is missing on this server; tell its owner")
        return student.folder
    loaded = store.teacher(teacher.model)
    strengths = list(student.strengths) if strengths is None else strengths
    schedule = student.schedule_on(loaded.default_shift)
    styles = [[lora.sha256, lora.strength, lora.network] for lora in teacher.options.get("teacher_loras", ())]
    salt = json.dumps([teacher.key, styles, schedule.as_dict(), student.cfg])
    folder = published_dir() / published_folder_name(student.lora, strengths, salt)
    if not (folder / MANIFEST).is_file():
        for path in student.lora:
            if not path.is_file():
                raise InputError(f"a LoRA file of {student.name!r} is missing on this server; tell its owner")
        try:
            make_published_student(folder, student.lora, loaded, schedule, strengths, student.cfg,
                                   teacher_id=teacher.model)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        _prune_variants(keep=folder)
    return folder


def _prune_variants(keep: Path) -> None:
    folders = sorted((p for p in published_dir().iterdir() if p.is_dir() and p != keep),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in folders[limits.SHOWCASE_STRENGTH_VARIANTS - 1:]:
        shutil.rmtree(stale, ignore_errors=True)


def load_everything(store: ShowcaseStore) -> None:
    """``load: eager``: every teacher and student before the app serves."""
    for teacher in store.showcase.teachers:
        for student in teacher.students:
            store.student(student_folder(store, teacher, student))


# --- handlers ------------------------------------------------------------------------------------------------
def on_pick(showcase: Showcase, slider_count: int, pair):
    """Outputs: the pair's description, teacher steps and CFG, then one update per strength slider."""
    try:
        teacher, student = showcase.pair(pair)
    except ShowcaseError as err:
        return (error_markdown(str(err)), gr.skip(), gr.skip()) + (gr.skip(),) * slider_count
    if student.is_published:
        schedule = student.schedule
        kind = (f"published LoRA, one file per phase ({', '.join(p.name for p in student.lora)}); boundaries "
                f"{', '.join(f'{b:g}' for b in schedule.boundaries) or 'none'}, steps {list(schedule.steps)}, shift "
                f"{f'{schedule.shift:g}' if student.own_shift else 'the teacher' + chr(39) + 's'}, NFE {schedule.nfe}")
    else:
        manifest = Manifest.read(student.folder) if (student.folder / MANIFEST).is_file() else None
        kind = f"{manifest.method} student, schedule {manifest.schedule.describe()}" if manifest else "missing"
    text = f"**{teacher.name}** next to **{student.name}**: {kind}."
    return (text, gr.update(value=teacher.steps) if teacher.steps else gr.skip(),
            gr.update(value=teacher.cfg) if teacher.cfg is not None else gr.skip(),
            *strength_updates(slider_count, len(student.strengths), student.strengths))


def on_status(store: ShowcaseStore, pair) -> str:
    """The line shown while the run starts: a first request loads the models (lazy loading)."""
    try:
        teacher, _ = store.showcase.pair(pair)
    except ShowcaseError as err:
        return error_markdown(str(err))
    if store.is_loaded(teacher):
        return "Running the student…"
    return f"Loading **{teacher.name}** (the first request loads it; a large model takes minutes)…"


def takes_image(store: ShowcaseStore, pair) -> bool:
    """Whether the pair's teacher takes an image: its examples carry one, or it is loaded and says so (a lazy
    showcase learns it on the first request, which loads the teacher)."""
    teacher, _ = store.showcase.pair(pair)
    if any(image is not None for _, _, image in teacher.examples):
        return True
    return store.is_loaded(teacher) and "image" in store.teacher(teacher.model).conditions


def on_image_box(store: ShowcaseStore, pair) -> dict:
    """The image input: shown for a pair whose teacher takes an image, hidden (and emptied) otherwise."""
    try:
        shown = takes_image(store, pair)
    except ERRORS:
        return gr.skip()
    return gr.update(visible=True) if shown else gr.update(visible=False, value=None)


def on_student(store: ShowcaseStore, pair, prompt, seed, *strengths, image=None):
    """Outputs: student video, student image, caption, status, run state (None when refused). ``image``: the
    uploaded condition image's path (ui.comparison.image_input), for a teacher that takes one."""
    try:
        teacher, student = store.showcase.pair(pair)
        prompt, _ = check_prompt(prompt, teacher.model)
        seed = resolve_seed(seed, False)
        condition = condition_image(image)
        folder = student_folder(store, teacher, student,
                                parse_strengths(strengths, len(student.lora)) if student.is_published else None)
        schedule = store.manifest(folder).schedule
        (row,) = sample_side(student_side(store, folder, schedule, boundary_states=False),
                             [([prompt], seed, () if condition is None else (condition,))])
    except ERRORS as err:
        return gr.skip(), gr.skip(), gr.skip(), error_markdown(f"Refused: {err}"), None
    picture = row.pictures[0]
    run = {"pair": pair, "prompt": prompt, "seed": seed, "nfe": row.nfe, "seconds": row.seconds,
           "image": still(picture), "boundaries": list(schedule.boundaries), "condition": condition}
    caption = f"**Student {student.name}** — NFE {row.nfe}, {row.seconds:.2f} s, seed {seed}"
    return (*media(picture, student.name), caption, f"Student done in {row.seconds:.2f} s; running the teacher…",
            run)


def on_teacher(store: ShowcaseStore, run, steps, cfg):
    """Outputs: teacher video, teacher image, caption, before/after slider, summary, status."""
    if not run:
        return (gr.skip(),) * 6
    try:
        teacher, _ = store.showcase.pair(run.get("pair"))
        steps = bounded_number(steps, "teacher steps", 1, limits.MAX_TEACHER_STEPS, whole=True)
        cfg = bounded_number(cfg, "CFG", 0, limits.MAX_CFG)
        schedule = teacher_schedule(steps, store.teacher(teacher.model).default_shift, tuple(run["boundaries"]))
        condition = run.get("condition")
        (row,) = sample_side(teacher_side(store, teacher.model, None, schedule, cfg, boundary_states=False),
                             [([run["prompt"]], run["seed"], () if condition is None else (condition,))])
    except ERRORS as err:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), error_markdown(f"Refused: {err}")
    pictures, nfe, seconds = row.pictures, row.nfe, row.seconds
    video, image = media(pictures[0], teacher.name)
    slider = before_after(pictures[0], run["image"])
    summary = (f"### {seconds / max(run['seconds'], 1e-9):.1f}× faster\nStudent NFE {run['nfe']} in "
               f"{run['seconds']:.2f} s · teacher NFE {nfe} in {seconds:.2f} s · seed {run['seed']}")
    return (video, image, f"**Teacher {teacher.name}** ({steps} steps, CFG {cfg:g}) — NFE {nfe}, {seconds:.2f} s",
            slider, summary, "Done.")


# --- layout --------------------------------------------------------------------------------------------------
def build_showcase_tab(store: ShowcaseStore) -> None:
    showcase = store.showcase
    opening = "/".join(showcase.opening)
    first_teacher, first_student = showcase.pair(opening)
    slider_count = max([len(s.lora) for t in showcase.teachers for s in t.students] + [0])
    examples = [[f"{t.name}/{t.students[0].name}", prompt, seed, None if image is None else str(image)]
                for t in showcase.teachers for prompt, seed, image in t.examples]
    with_images = any(example[3] is not None for example in examples)
    with gr.Row():
        with gr.Column(scale=2):
            pair = gr.Dropdown(showcase.pairs(), value=opening, label="Teacher / student", elem_id="showcase-pair")
            info = gr.Markdown(on_pick(showcase, slider_count, opening)[0], elem_id="showcase-info")
            prompt = gr.Textbox(examples[0][1] if examples else "", label="Prompt", elem_id="showcase-prompt")
            image = image_input(label=f"Image (PNG, JPEG or WebP, up to {limits.MAX_IMAGE_PIXELS // 2**20} MP)",
                                visible=takes_image(store, opening), elem_id="showcase-image")
            seed = gr.Number(examples[0][2] if examples else 0, label="Seed", precision=0, minimum=0,
                             maximum=limits.MAX_SEED, elem_id="showcase-seed")
            with gr.Row():
                steps = gr.Slider(1, limits.MAX_TEACHER_STEPS, first_teacher.steps or 28, step=1, label="Teacher steps")
                cfg = gr.Slider(0, 10, first_teacher.cfg if first_teacher.cfg is not None else 4.0, step=0.5,
                                label="Teacher CFG")
            strengths = strength_sliders(slider_count, len(first_student.strengths), "showcase-")
            run_button = gr.Button("Run comparison", variant="primary", elem_id="showcase-run")
            status = gr.Markdown(elem_id="showcase-status")
            if examples:
                gr.Examples(examples if with_images else [example[:3] for example in examples],
                            [pair, prompt, seed, image] if with_images else [pair, prompt, seed], label="Examples")
        with gr.Column(scale=3):
            summary = gr.Markdown(elem_id="showcase-summary")
            teacher_side, student_side, slider = side_views("showcase-", "showcase-slider")
    run_state = gr.State(None)
    pick_outputs = [info, steps, cfg, *strengths]
    pair.change(partial(on_pick, showcase, slider_count), pair, pick_outputs, api_name="showcase_pick")
    pair.change(partial(on_image_box, store), pair, image, api_name=False, show_progress="hidden")

    # the image input comes after the strength sliders, so API calls sending none keep their argument positions;
    # gradio reads the API's parameter names, and which may be left out, from the signature
    def student_with_image(*values):
        *fields, image = values
        return on_student(store, *fields, image=image)
    student_with_image.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
         for name in ("pair", "prompt", "seed", *(f"strength_{k + 1}" for k in range(slider_count)))]
        + [inspect.Parameter("image", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])

    # as in Compare: the few-step student never waits behind another visitor's teacher run
    run_button.click(partial(on_status, store), pair, status, api_name="showcase_status").then(
        student_with_image, [pair, prompt, seed, *strengths, image],
        [*student_side, status, run_state], api_name="showcase_student", concurrency_id="student",
        concurrency_limit=limits.SAMPLE_SLOTS).then(
        partial(on_teacher, store), [run_state, steps, cfg], [*teacher_side, slider, summary, status],
        api_name="showcase_teacher", concurrency_id="teacher", concurrency_limit=limits.SAMPLE_SLOTS).then(
        partial(on_image_box, store), pair, image, api_name=False, show_progress="hidden")  # the teacher is loaded
