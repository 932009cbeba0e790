"""What one comparison computes and shows, for Compare and Showcase alike: the teacher's own grid split at the
student's boundaries, a side sampled with its NFE, wall time and boundary states, each side as an image or a
playable mp4 (GIF only where no mp4 writer is installed), the before/after slider, the per-phase LoRA strength
sliders, the boundary strip and the downloadable comparison PNG."""
from __future__ import annotations

import itertools
import math
import tempfile
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import torch
from PIL import Image
from torch import Tensor

from pdmd import limits
from pdmd.conditions import SUFFIXES
from pdmd.core.rectified_flow import unshift_time
from pdmd.core.sampling import per_phase
from pdmd.core.schedule import PhaseSchedule
from pdmd.media import save_video
from pdmd.students.folder import Student, check_images
from pdmd.students.manifest import Manifest
from pdmd.teachers import same_teacher, teacher_key
from pdmd.teachers.base import Teacher
from ui import images, students
from ui.batching import Batcher
from ui.gpu import evaluations, gpu_seconds, images_within, on_zero_gpu, run_on_gpu
from ui.inputs import USER_ERRORS, InputError, parse_teacher_phases, schedule_of
from ui.models import ModelStore, sampling_device, store_by_id, to_device
from ui.teacher_picker import teacher_pick

AS_TRAINED, FROM_PHASES = "as trained", "from the Phases tab"
DOWNLOAD_DIR = Path(tempfile.gettempdir()) / "pdmd-app"


def clean_downloads(max_age_s: float = limits.DOWNLOAD_MAX_AGE_S) -> None:
    """Remove the app's temporary outputs (comparison PNGs, GIFs, zips) older than ``max_age_s``: called at
    start and whenever a new one is written, so they never pile up."""
    cutoff = time.time() - max_age_s
    for path in DOWNLOAD_DIR.rglob("*") if DOWNLOAD_DIR.is_dir() else ():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass  # another request removed it first


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


def still(picture: Tensor, size: int = images.DISPLAY_SIZE) -> Image.Image:
    """An image (3, H, W), or a video's first frame (F, 3, H, W), for display: small outputs enlarged to
    ``size``, large ones kept at their own size."""
    frame = picture[0] if picture.dim() == 4 else picture
    return images.to_pil(frame, max(size, *frame.shape[-2:]) if size == images.DISPLAY_SIZE else size)


def media(picture: Tensor, label: str) -> tuple[dict, dict]:
    """(video update, image update) for one side: an image in the image box; a video as a playable mp4 in the
    video box, or an animated GIF in the image box where no mp4 writer (imageio-ffmpeg) is installed."""
    if picture.dim() == 3:
        return gr.update(visible=False, value=None), gr.update(visible=True, value=still(picture))
    factor = max(1, images.DISPLAY_SIZE // max(picture.shape[-2:]))  # tiny videos enlarged, pixels kept crisp
    picture = picture.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
    clean_downloads()
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    stem = DOWNLOAD_DIR / f"{students.sanitise(label, 'video')}-{uuid.uuid4().hex[:8]}"
    try:
        return (gr.update(visible=True, value=str(save_video(picture[None], stem.with_suffix(".mp4")))),
                gr.update(visible=False, value=None))
    except ValueError:  # no imageio-ffmpeg: the GIF fallback
        return (gr.update(visible=False, value=None),
                gr.update(visible=True, value=str(save_video(picture[None], stem.with_suffix(".gif")))))


def before_after(teacher_picture: Tensor, student_image: Image.Image) -> dict:
    """The before/after slider's update: teacher ◀ ▶ student (same seed) for images; hidden for a video, whose
    mp4s play side by side."""
    if teacher_picture.dim() != 3:
        return gr.update(visible=False, value=None)
    return gr.update(visible=True, value=(still(teacher_picture), student_image))


# --- layout shared by Compare and Showcase ------------------------------------------------------------------------
def image_input(**kwargs) -> gr.File:
    """The condition-image upload of Compare and Showcase. A gr.File: its preprocess (gradio 6.31) hands the
    handler the uploaded file's path without opening it, so the first thing to open a visitor's file is
    pdmd.conditions.open_image (ui.inputs.condition_image), which refuses it from its size and header. Not gr.Image:
    its preprocess (image_utils.preprocess_image) PIL-opens the file, converts it to ``image_mode`` -- a full
    decode -- and decodes a data: URL in full before any handler runs, so a 20000x20000 PNG would be decoded
    before our check; and a gr.Image subclass with its own preprocess makes gradio write a .pyi stub beside its
    module at import. The suffixes are open_image's; a text file named .png gets through to it and is refused
    there."""
    return gr.File(file_count="single", file_types=list(SUFFIXES), type="filepath", **kwargs)


def side_views(prefix: str, slider_id: str) -> tuple[tuple, tuple, gr.ImageSlider]:
    """Teacher and student side by side, each (video, image, caption) with elem_ids ``{prefix}teacher-video``
    etc., and the before/after slider (``slider_id``; shown once an image comparison has run)."""
    sides = []
    with gr.Row():
        for side in ("teacher", "student"):
            with gr.Column():
                sides.append((
                    gr.Video(label=side.title(), interactive=False, autoplay=True, loop=True, visible=False,
                             elem_id=f"{prefix}{side}-video"),
                    gr.Image(label=side.title(), type="pil", interactive=False, elem_id=f"{prefix}{side}-image"),
                    gr.Markdown(elem_id=f"{prefix}{side}-caption")))
    slider = gr.ImageSlider(label="Teacher ◀ ▶ student (same seed)", type="pil", interactive=False, visible=False,
                            elem_id=slider_id)
    return sides[0], sides[1], slider


def strength_sliders(count: int, shown: int, prefix: str) -> list[gr.Slider]:
    """``count`` LoRA strength sliders in [0, MAX_STRENGTH], one per phase, the first ``shown`` visible; a
    handler reads the first as many as its student has phases (inputs.parse_strengths)."""
    return [gr.Slider(0, limits.MAX_STRENGTH, 1.0, step=0.05, label=f"Phase {k + 1} LoRA strength",
                      visible=k < shown, elem_id=f"{prefix}strength-{k + 1}") for k in range(count)]


def strength_updates(count: int, shown: int, values=()) -> list[dict]:
    """One update per strength slider: the first ``shown`` visible, set to ``values`` where given."""
    return [gr.update(visible=k < shown, **({"value": values[k]} if k < len(values) else {})) for k in range(count)]


@dataclass
class BoundaryState:
    t: float
    state: Image.Image     # x_t decoded
    denoised: Image.Image  # the model's x_0 prediction from x_t


class Row(NamedTuple):
    """Prompts sampled together (one batch), the seed of their noise, and each prompt's condition image for a
    teacher that takes one (RGB PIL images from ui.inputs.condition_image: plain values, they pickle into a
    ZeroGPU worker), or none."""
    prompts: tuple[str, ...]
    seed: int
    images: tuple = ()


@dataclass(frozen=True)
class Side:
    """One side of a comparison as plain values: what crosses into a ZeroGPU worker, where _sample_side finds the
    model in its copy of the store. Hashable, so requests for the same side can share one call."""
    store: int                             # ModelStore.id
    boundaries: tuple[float, ...]          # the schedule as data
    steps: tuple[int, ...]
    shift: float
    cfg: float | None                      # a teacher side's CFG; a student side's for the phases the teacher takes
    teacher: tuple | None = None           # a teacher side: teacher_key(name, options)
    student: str | None = None             # a student side: its folder (its experts run at its own CFG)
    teacher_phases: tuple[int, ...] = ()   # the student's 0-based phases the teacher samples instead
    boundary_states: bool = True           # decode x_t and the x0 prediction at each interior boundary
    # its rows carry condition images (sample_side sets it): a batch is one encode call, so rows with images and
    # rows without never share one
    conditioned: bool = False

    @property
    def schedule(self) -> PhaseSchedule:
        return PhaseSchedule(self.boundaries, self.steps, self.shift)


def teacher_side(store: ModelStore, name: str, options: dict | None, schedule: PhaseSchedule, cfg: float,
                 boundary_states: bool = True) -> Side:
    return Side(store.id, schedule.boundaries, schedule.steps, schedule.shift, float(cfg),
                teacher=teacher_key(name, options), boundary_states=boundary_states)


def student_side(store: ModelStore, folder: Path, schedule: PhaseSchedule, teacher_cfg: float | None = None,
                 teacher_phases=(), boundary_states: bool = True) -> Side:
    """``teacher_cfg``: the CFG of the phases handed back to the teacher (None: its own default)."""
    return Side(store.id, schedule.boundaries, schedule.steps, schedule.shift,
                None if teacher_cfg is None else float(teacher_cfg), student=str(folder),
                teacher_phases=tuple(teacher_phases), boundary_states=boundary_states)


@dataclass
class SampledRow:
    """One row sampled, as it comes back from the GPU call: CPU tensors, PIL images and numbers."""
    pictures: Tensor              # (prompts, 3, H, W), or (prompts, F, 3, H, W) for a video teacher, on the CPU
    nfe: int                      # network evaluations per sample, CFG counted
    seconds: float                # wall time: sampling and decoding
    states: list[BoundaryState]   # the first picture's state at each interior boundary (none unless asked)


def sample_side(side: Side, rows: list, on_step=None) -> list[SampledRow]:
    """Each row's pictures with their NFE, wall seconds and boundary states; a row is ``(prompts, seed)`` or
    ``(prompts, seed, images)`` (Row). Requests for the same side that arrive while one runs are sampled together,
    as one network batch (ui/batching.py), each row from its own seed's noise and with its own images. A batch is
    the app's one GPU call: on ZeroGPU it runs inside spaces.GPU for a time sized to its network evaluations
    (ui/gpu.py). ``on_step(done, total)``: live progress over the batch's Euler steps, where the call runs in this
    process. Images the side's teacher cannot take, or none where it needs them, are refused here (InputError)."""
    rows = [Row(tuple(row[0]), int(row[1]), tuple(row[2]) if len(row) > 2 else ()) for row in rows]
    return _BATCHER.submit(replace(side, conditioned=_conditioned(side, rows)), rows, on_step)


def _conditioned(side: Side, rows: list[Row]) -> bool:
    """Whether the rows carry condition images, checked against the side's teacher (loaded here, as it would be
    for the batch) before any batch forms: one image per prompt, every row or none."""
    _, student, teacher = _model(side)
    if student is not None:  # a student's experts learnt with an image or without one, not both
        for row in rows:
            check_images(students.student_name(student.folder), student.manifest, list(row.images) or None)
    for row in rows:
        if row.images and len(row.images) != len(row.prompts):
            raise InputError(f"{len(row.images)} image(s) for {len(row.prompts)} prompt(s): give one per prompt")
    with_images = {bool(row.images) for row in rows}
    if True in with_images and "image" not in teacher.conditions:
        raise InputError(f"{teacher.name} is a text-only teacher: it takes no image; remove the image")
    if False in with_images and teacher.needs_conditions:
        raise InputError(f"{teacher.name} samples from an image and cannot run from the prompt alone: upload an "
                         "image (PNG, JPEG or WebP) under the prompt")
    if len(with_images) > 1:
        raise InputError("give every row of a request an image, or none")
    return with_images == {True}


def _run_batch(side: Side, rows: list[Row], on_step=None) -> list[SampledRow]:
    nfe, video = _evaluations(side)
    seconds = gpu_seconds(nfe, sum(len(row.prompts) for row in rows), video)
    return run_on_gpu(_sample_side, side, rows, seconds=seconds, on_step=on_step)


def _batch_images(side: Side) -> int:
    """A batch's images: BATCH_IMAGES, and on ZeroGPU no more than one call's GPU time can sample."""
    return min(limits.BATCH_IMAGES, images_within(*_evaluations(side))) if on_zero_gpu() else limits.BATCH_IMAGES


_BATCHER = Batcher(_run_batch, max_rows=_batch_images, size=lambda row: len(row[0]),
                   lane=lambda side: "teacher" if side.student is None else "student",
                   background=lambda side: side.student is None)


def side_schedule(side: Side) -> PhaseSchedule:
    """The schedule ``side`` samples: a student's with its handed-back phases at the teacher's steps."""
    _, student, _ = _model(side)
    return _sampling(side, student)[0]


def _evaluations(side: Side) -> tuple[int, bool]:
    """(network evaluations of one sample, CFG counted; whether it is a video). The models load here, in the app's
    process and outside GPU time: a worker forked for the call has them, and a model that cannot load is refused
    with its message before any GPU is asked for."""
    _, student, teacher = _model(side)
    schedule, _, cfg = _sampling(side, student)
    return evaluations(schedule.steps, per_phase(cfg, schedule.num_phases), teacher.guidance_embedded), teacher.is_video


def _model(side: Side) -> tuple[threading.Lock, Student | None, Teacher]:
    """The lock of the side's network, its student (None on a teacher side) and the teacher network it runs on,
    from this process's store (loaded on first use)."""
    store = store_by_id(side.store)
    if side.student is None:
        name, options = side.teacher
        entry = store.loaded_teacher(name, dict(options))
        return entry.lock, None, entry.teacher
    loaded = store.student(Path(side.student))
    return loaded.lock, loaded.student, loaded.student.roles.teacher


def _sampling(side: Side, student: Student | None) -> tuple[PhaseSchedule, list | None, float | tuple]:
    """(schedule, experts, CFG) for Teacher.sample: the teacher's own velocity, or the student's experts with the
    handed-back phases taken by the teacher (Student.with_teacher_phases)."""
    if student is None:
        return side.schedule, None, side.cfg
    return student.with_teacher_phases(side.teacher_phases, side.schedule, teacher_cfg=side.cfg)


def _sample_side(side: Side, rows: list[Row], on_step=None) -> list[SampledRow]:
    """The GPU function: plain values in, plain values out (ui/gpu.py)."""
    lock, student, teacher = _model(side)
    with lock:
        to_device(teacher, sampling_device())  # on ZeroGPU: from the app's RAM onto this call's GPU
        schedule, experts, cfg = _sampling(side, student)
        # active(None) around the sampling: a student's experts swap merged weights into the network, and a big
        # teacher shares that network with its student, so it must be the plain teacher again afterwards
        with student.roles.active(None) if student is not None else nullcontext():
            return _sample_rows(teacher, rows, schedule, cfg, experts, side.boundary_states, on_step)


def _sample_rows(teacher: Teacher, rows: list[Row], schedule: PhaseSchedule, cfg, experts, boundary_states: bool,
                 on_step) -> list[SampledRow]:
    """Every row's prompts in one network batch, each row from ``teacher.noise(len(prompts), seed)`` -- the noise
    it would have alone -- and with its own images, so a row's pictures do not depend on its company (up to float
    rounding)."""
    edges = list(itertools.accumulate((len(row.prompts) for row in rows), initial=0))
    firsts = torch.tensor(edges[:-1])  # each row's first picture carries its boundary states
    captured = {}

    def record(step: dict):
        for t in schedule.boundaries if boundary_states else ():
            if math.isclose(step["sigma"], t, abs_tol=1e-9):
                captured[t] = (step["x"][firsts.to(step["x"].device)], step["denoised"][firsts.to(step["x"].device)])
        if on_step is not None:
            on_step(step["i"] + 1, schedule.nfe)

    start = time.perf_counter()
    noise = torch.cat([teacher.noise(len(row.prompts), row.seed) for row in rows])
    prompts = [prompt for row in rows for prompt in row.prompts]
    conditions = [image for row in rows for image in row.images] or None  # every row's or none (Side.conditioned)
    result = teacher.sample(prompts, schedule=schedule, cfg=cfg, experts=experts, callback=record, noise=noise,
                            images=conditions)
    pictures = teacher.decode(result.sample).cpu()  # the app's process of a ZeroGPU call has no GPU to receive it
    seconds = time.perf_counter() - start
    decoded = {t: (teacher.decode(x).cpu(), teacher.decode(d).cpu()) for t, (x, d) in captured.items()}
    return [SampledRow(pictures[top:bottom], result.nfe, seconds,
                       [BoundaryState(t, still(x[k], images.TILE_SIZE), still(d[k], images.TILE_SIZE))
                        for t, (x, d) in decoded.items()])
            for k, (top, bottom) in enumerate(zip(edges, edges[1:]))]


def student_schedule(student_schedule_: PhaseSchedule, source: str, phases_schedule: dict | None) -> PhaseSchedule:
    if source != FROM_PHASES:
        return student_schedule_
    schedule = schedule_of(phases_schedule)
    if schedule.num_phases != student_schedule_.num_phases:
        raise InputError(f"the Phases tab's schedule has {schedule.num_phases} phase(s) but this student has "
                         f"{student_schedule_.num_phases} expert(s); pick a matching schedule or 'as trained'")
    return schedule


def student_of(store: ModelStore, value: str, teacher_name: str) -> tuple[Path, Manifest]:
    """The picked student's folder and manifest; it must be a student of the picked teacher."""
    folder = students.resolve_student_folder(value)
    manifest = store.manifest(folder)
    if not same_teacher(manifest.teacher, teacher_name):
        raise InputError(f"{students.student_name(folder)} is a student of {manifest.teacher!r}, not of the "
                         f"selected teacher {teacher_name!r}: load its teacher first")
    return folder, manifest


def run_student_side(store: ModelStore, prompts: list[str], seed: int, value: str, source: str,
                     phases_schedule: dict | None, teacher_cfg: float, teacher=None, teacher_phases=None,
                     boundary_states: bool = True, images=()) -> tuple[str, PhaseSchedule, SampledRow, dict]:
    """Sample the picked student (or the baseline); returns (label, schedule, the sampled row, the teacher state
    the teacher side must use: the student's own teacher at its resolution). ``teacher_phases``: the checked
    "phase k" labels the teacher takes instead of the student's experts (Student.with_teacher_phases, at
    ``teacher_cfg``), checked before anything loads. ``images``: one condition image per prompt, or none."""
    name, options = teacher_pick(teacher)
    if value == students.BASELINE:
        if teacher_phases:
            raise InputError("the baseline is the teacher already: handing phases to the teacher needs a student")
        schedule = schedule_of(phases_schedule)
        (row,) = sample_side(teacher_side(store, name, options, schedule, teacher_cfg, boundary_states),
                             [(prompts, seed, images)])
        return "Baseline (teacher, no distillation)", schedule, row, {"name": name, "options": options}
    folder, manifest = student_of(store, value, name)
    handed_back = parse_teacher_phases(teacher_phases, manifest.schedule.num_phases)
    side = student_side(store, folder, student_schedule(manifest.schedule, source, phases_schedule), teacher_cfg,
                        handed_back, boundary_states)
    (row,) = sample_side(side, [(prompts, seed, images)])
    schedule = side_schedule(side)
    own = {"name": manifest.teacher, "options": manifest.teacher_load_options(folder)}
    label = f"Student {students.student_name(folder)}"
    if handed_back:
        taken = " and ".join(f"{k + 1}" for k in handed_back)
        label += (f", phase{'s' * (len(handed_back) > 1)} {taken} by the teacher "
                  f"({schedule.steps[handed_back[0]]} steps each, CFG {teacher_cfg:g})")
    return label, schedule, row, own


def picked_schedule(store: ModelStore, value: str, teacher=None) -> PhaseSchedule | None:
    """The picked student's schedule (None for the baseline, or a pick that cannot be read)."""
    if value == students.BASELINE:
        return None
    try:
        return student_of(store, value, teacher_pick(teacher)[0])[1].schedule
    except USER_ERRORS:
        return None


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
    clean_downloads()
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    path = DOWNLOAD_DIR / f"comparison-seed{student_run['seed']}-{uuid.uuid4().hex[:8]}.png"
    images.stack_vertically([header, body, footer]).save(path)
    return str(path)

