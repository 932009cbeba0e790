"""Compare tab: the teacher and a few-step student on the same prompt and seed, side by side.

One click runs two events: the student first (it takes a fraction of a second, so its image appears at
once), then the teacher with a progress bar, which also fills the boundary strip, the speed-up and the
downloadable comparison PNG. Handlers are plain functions of their inputs; build_compare_tab wires them.

The teacher is picked at the top (the built-in one, or a diffusers pipeline folder / Hub id typed in, optionally
with a style LoRA fused in: base + style is then the teacher); the student picker lists that teacher's students.
A video teacher (Wan) plays its samples as mp4s side by side (animated GIFs where no mp4 writer is installed); the
boundary strip and the comparison PNG use their first frames. An image teacher adds a before/after slider (teacher
vs student, same seed). A teacher that takes an image (image-to-video, editing: ``Teacher.conditions``) shows an
image input under the prompt, and both sides sample on that image, prompt and seed. Published LoRA files (e.g.
Wan2.2-Lightning's high- and low-noise pair) become a student folder under runs/uploads through
pdmd.students.lora_formats, at one strength per phase set with a slider each.
"""
from __future__ import annotations

from functools import partial

import gradio as gr

from pdmd import limits
from pdmd.core.schedule import PhaseSchedule
from pdmd.limits import MAX_CFG, MAX_DIVERSITY_SEEDS, MAX_PHASES, MAX_SEED, MAX_STRENGTH, MAX_TEACHER_STEPS
from pdmd.students import lora_formats
from pdmd.teachers import BUILTIN
from pdmd.teachers.style_loras import describe_styles
from ui import images, students
from ui.comparison import (
    AS_TRAINED,
    FROM_PHASES,
    before_after,
    boundary_strip,
    comparison_png,
    image_input,
    media,
    picked_schedule,
    run_student_side,
    sample_side,
    side_views,
    still,
    strength_sliders,
    strength_updates,
    student_schedule,
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
    phase_choices,
    resolve_seed,
    schedule_of,
)
from ui.models import ModelStore
from ui.student_files import on_export_student, on_import_published, on_upload
from ui.teacher_picker import on_load_teacher, supported_pipelines, teacher_choices, teacher_pick

EXAMPLES = [
    ["a red star on a dark background", 0],
    ["a blue circle on a light background", 7],
    ["a yellow triangle on a sky background", 42],
    ["a green square on a grey background", 3],
]


# --- handlers --------------------------------------------------------------------------------------------------
def describe_student(store: ModelStore, value: str, source: str, phases_schedule: dict | None) -> str:
    """Markdown: which schedule the picked student will run (boundaries, steps per phase, shift)."""
    try:
        if value == students.BASELINE:
            schedule = schedule_of(phases_schedule)
            return f"**Baseline schedule** (Phases tab): {schedule.describe()}; the teacher's CFG."
        manifest = store.manifest(students.resolve_student_folder(value))
        schedule = student_schedule(manifest.schedule, source, phases_schedule)
    except USER_ERRORS as err:
        return error_markdown(str(err))
    if manifest.is_published:
        published = manifest.published
        return (f"**Published student** ({source}): {schedule.describe()}; CFG {manifest.student_cfg:g}; "
                f"files {', '.join(published.get('files', []))} at strengths "
                f"{', '.join(f'{s:g}' for s in published.get('strengths', []))}.")
    styles = (f"; its teacher carries style LoRA(s) {describe_styles(manifest.teacher_loras)}"
              if manifest.teacher_loras else "")
    return (f"**Student schedule** ({source}): {schedule.describe()}; CFG {manifest.student_cfg:g}; "
            f"method {manifest.method}, {manifest.updates_trained} updates trained{styles}.")


def on_compare_student(store: ModelStore, prompt, seed, randomise, student_value, source, phases_schedule,
                       teacher_cfg, teacher=BUILTIN, teacher_phases=(), image=None):
    """Outputs: student video, student image (see comparison.media), its caption, the seed used (written back to
    the seed box), status, run state (None when the input is bad). ``teacher_phases``: the "phase k" labels the
    teacher takes over from the student (its steps / phases Euler steps each, at ``teacher_cfg``). ``image``: the
    uploaded condition image's path (comparison.image_input) for a teacher that takes one; the teacher side
    samples on it too."""
    try:
        prompt, note = check_prompt(prompt, teacher_pick(teacher)[0])
        seed = resolve_seed(seed, randomise)
        cfg = bounded_number(teacher_cfg, "CFG", 0, MAX_CFG)
        condition = condition_image(image)
        label, schedule, row, own = run_student_side(
            store, [prompt], seed, student_value, source, phases_schedule, cfg, teacher, teacher_phases,
            images=() if condition is None else (condition,))
    except USER_ERRORS as err:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), error_markdown(str(err)), None
    picture = row.pictures[0]
    caption = f"**{label}** — NFE {row.nfe}, {row.seconds:.2f} s, seed {seed}"
    run = {"prompt": prompt, "seed": seed, "label": label, "nfe": row.nfe, "seconds": row.seconds, "teacher": own,
           "image": still(picture), "boundaries": list(schedule.boundaries), "states": row.states,
           "condition": condition}  # the checked image itself: the teacher side opens no file
    status = f"Student done in {row.seconds:.2f} s; running the teacher… {note}".strip()
    return *media(picture, label), caption, seed, status, run


def on_compare_teacher(store: ModelStore, run: dict | None, steps, cfg, progress=gr.Progress()):
    """Outputs: teacher video, teacher image, its caption, speed-up summary, boundary strip, comparison PNG
    path, before/after slider, status."""
    if not run:  # the student step rejected the input and already said why
        return (gr.skip(),) * 8
    try:
        steps = bounded_number(steps, "teacher steps", 1, MAX_TEACHER_STEPS, whole=True)
        cfg = bounded_number(cfg, "CFG", 0, MAX_CFG)
        name, options = teacher_pick(run.get("teacher"))
        schedule = teacher_schedule(steps, store.teacher(name, options).default_shift, tuple(run["boundaries"]))
        condition = run.get("condition")
        (row,) = sample_side(teacher_side(store, name, options, schedule, cfg),
                             [([run["prompt"]], run["seed"], () if condition is None else (condition,))],
                             on_step=lambda done, total: progress(done / total, desc=f"teacher step {done}/{total}"))
    except USER_ERRORS as err:
        return (gr.skip(),) * 7 + (error_markdown(str(err)),)
    pictures, nfe, seconds = row.pictures, row.nfe, row.seconds
    teacher_run = {"label": f"Teacher ({steps} steps, CFG {cfg:g})", "nfe": nfe, "seconds": seconds,
                   "image": still(pictures[0]), "states": row.states}
    speedup = seconds / max(run["seconds"], 1e-9)
    summary = (f"### {speedup:.1f}× faster\nStudent NFE {run['nfe']} in {run['seconds']:.2f} s · teacher NFE {nfe} "
               f"in {seconds:.2f} s · {nfe / max(run['nfe'], 1):.0f}× fewer model evaluations · seed {run['seed']}")
    return (*media(pictures[0], "teacher"), f"**{teacher_run['label']}** — NFE {nfe}, {seconds:.2f} s", summary,
            boundary_strip(run, teacher_run), comparison_png(run, teacher_run), before_after(pictures[0], run["image"]),
            "Done.")


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
        label, _, student_row, _ = run_student_side(
            store, [prompt] * count, seed, student_value, source, phases_schedule, cfg, boundary_states=False)
    except USER_ERRORS as err:
        return gr.skip(), gr.skip(), error_markdown(str(err))
    schedule = PhaseSchedule.uniform(steps, store.teacher(BUILTIN).default_shift)
    (teacher_row,) = sample_side(
        teacher_side(store, BUILTIN, {}, schedule, cfg, boundary_states=False), [([prompt] * count, seed)],
        on_step=lambda done, total: progress(done / total, desc=f"teacher step {done}/{total}"))
    teacher_pictures, student_pictures = teacher_row.pictures, student_row.pictures
    probe = store.probe()
    scores = [metrics.feature_diversity([metrics.probe_outputs(probe, p)["features"]])
              for p in (teacher_pictures, student_pictures)]
    grids = [images.image_grid([images.to_pil(p, images.TILE_SIZE) for p in pictures], columns=4)
             for pictures in (teacher_pictures, student_pictures)]
    text = (f"**Diversity** (mean pairwise distance of probe features over {count} seeds; higher = more varied): "
            f"teacher **{scores[0]:.3f}**, {label.lower()} **{scores[1]:.3f}** "
            f"({scores[1] / max(scores[0], 1e-9):.0%} of the teacher's).")
    return grids[0], grids[1], text


def on_pick_student(store: ModelStore, value: str, teacher=BUILTIN) -> dict:
    """The "Teacher takes phase" boxes: one per phase of the picked student, none checked; hidden for the
    baseline and for a one-phase student (handing back its only phase is the teacher's own comparison)."""
    return gr.update(**teacher_phase_boxes(store, value, teacher), value=[])


def teacher_phase_boxes(store: ModelStore, value: str, teacher=BUILTIN) -> dict:
    schedule = picked_schedule(store, value, teacher)
    phases = schedule.num_phases if schedule else 0
    return dict(choices=phase_choices(phases, schedule.edges if schedule else ()), visible=phases > 1)


def on_phase_count(phases_schedule) -> list[dict]:
    """The published-LoRA strength sliders: one visible per phase of the Phases tab's schedule."""
    try:
        phases = schedule_of(phases_schedule).num_phases
    except USER_ERRORS:
        return [gr.skip()] * MAX_PHASES
    return strength_updates(MAX_PHASES, phases)


def on_refresh_students(current: str, teacher=BUILTIN):
    """The student picker re-listed: the baseline and the selected teacher's students."""
    name = teacher_pick(teacher)[0]
    choices = students.picker_choices(name)
    values = [v for _, v in choices]
    return gr.update(choices=choices, value=current if current in values else students.default_choice(name, choices))


# --- layout -------------------------------------------------------------------------------------------------
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
                                  info=f"pipelines: {supported_pipelines()}", elem_id="compare-teacher-path")
        load_button = gr.Button("Load teacher", scale=0, min_width=120, elem_id="compare-load-teacher")
    with gr.Accordion("Teacher resolution (blank = the model's own; smaller renders faster)", open=False):
        with gr.Row():
            height = gr.Number(None, label="Height (px)", precision=0, minimum=0)
            width = gr.Number(None, label="Width (px)", precision=0, minimum=0)
            frames = gr.Number(None, label="Frames (video)", precision=0, minimum=0)
    # off on a public server, whose handler refuses it too (a visitor names no file of the server's)
    with gr.Accordion("Teacher style LoRA: distil your model, base + your style LoRA (fused in)", open=False,
                      visible=store.other_teachers):
        with gr.Row():
            # one file, fused into `transformer` (Wan 2.2 A14B: the high-noise network); a style per network
            # comes through a showcase file, a train config or `pdmd sample --teacher-lora`
            lora_file = gr.Textbox(label="Style LoRA file (.safetensors on this machine; blank = none)", scale=3,
                                   placeholder="/loras/my_style.safetensors", elem_id="compare-teacher-lora")
            lora_strength = gr.Number(1.0, label="Strength (0–2)", minimum=0, maximum=MAX_STRENGTH,
                                      elem_id="compare-teacher-lora-strength")
    teacher_status = gr.Markdown(elem_id="compare-teacher-status")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(EXAMPLES[0][0], label="Prompt", elem_id="compare-prompt",
                                info="colour, shape and background, e.g. 'a purple star on a sky background'")
            # shown for a teacher that takes an image (on_load_teacher); an API call that sends one anyway to a
            # text-only teacher is refused (comparison.sample_side)
            image = image_input(label=f"Image (PNG, JPEG or WebP, up to {limits.MAX_IMAGE_PIXELS // 2**20} MP)",
                                visible="image" in teacher.conditions, elem_id="compare-image")
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
            teacher_phases = gr.CheckboxGroup(
                value=[], label="Teacher takes phase", elem_id="compare-teacher-phases",
                **teacher_phase_boxes(store, picker.value),
                info="the teacher samples the checked phases instead of the student's experts (its steps / "
                     "phases Euler steps each, at the teacher CFG), same noise: which phase costs the student")
            schedule_info = gr.Markdown(elem_id="compare-schedule")
            with gr.Row():
                run_button = gr.Button("Run comparison", variant="primary", elem_id="compare-run", scale=3)
                cancel_button = gr.Button("Stop", elem_id="compare-cancel", scale=1, min_width=60)
            status = gr.Markdown(elem_id="compare-status")
            examples = gr.Examples(EXAMPLES, [prompt, seed], label="One-click examples")
        with gr.Column(scale=3):
            summary = gr.Markdown(elem_id="compare-summary")
            teacher_side, student_side, slider = side_views("", "compare-slider")  # ids teacher-video, ...
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
                    "steps run on: use the wan2.2-lightning preset (boundary 0.87, just below the switch at 0.875). "
                    "One strength slider per phase (0 = the teacher, 1 = as published, up to 2).")
        with gr.Row():
            published = gr.File(file_count="multiple", file_types=[".safetensors"], label="LoRA files", scale=3)
            with gr.Column(scale=2):
                strengths = strength_sliders(MAX_PHASES, schedule_of(schedule_state.value).num_phases, "published-")
                published_cfg = gr.Number(1.0, label="Student CFG (Lightning: 1)", minimum=0, maximum=MAX_CFG)
                import_button = gr.Button("Import as student")
        published_status = gr.Markdown()
    with gr.Accordion("Export the student's LoRAs (diffusers or ComfyUI)", open=False):
        with gr.Row():
            export_layout = gr.Radio(list(lora_formats.EXPORT_LAYOUTS), value="comfyui", label="Layout")
            export_button = gr.Button("Export")
            export_file = gr.DownloadButton("Download the LoRAs (.zip)")
        export_status = gr.Markdown()

    student_inputs = [prompt, seed, randomise, picker, source, schedule_state, cfg, teacher_state, teacher_phases,
                      image]
    student_outputs = [*student_side, seed, status, gr.State()]
    run_state = student_outputs[-1]
    teacher_outputs = [*teacher_side, summary, strip, download, slider, status]

    # Concurrency: a student image (a fraction of a second) never waits behind another visitor's teacher run:
    # each side has its own group. Many handlers run at once so that visitors' requests for one model share a
    # network batch (ui/batching.py); the batches themselves run one at a time per side.
    def chain(event, api: bool):
        return event.then(partial(on_compare_student, store), student_inputs, student_outputs,
                          api_name="compare_student" if api else False, concurrency_id="student",
                          concurrency_limit=limits.SAMPLE_SLOTS).then(
            partial(on_compare_teacher, store), [run_state, steps, cfg], teacher_outputs,
            api_name="compare_teacher" if api else False, concurrency_id="teacher",
            concurrency_limit=limits.SAMPLE_SLOTS)

    teacher_runs = [chain(run_button.click(lambda: "Running the student…", None, status, queue=False), api=True),
                    chain(examples.load_input_event.then(lambda: False, None, randomise), api=False)]

    describe_inputs = [picker, source, schedule_state]
    for trigger in (picker.change, source.change, schedule_state.change):
        trigger(partial(describe_student, store), describe_inputs, schedule_info, show_progress="hidden")
    picker.change(partial(on_pick_student, store), [picker, teacher_state], teacher_phases, show_progress="hidden")
    schedule_state.change(on_phase_count, schedule_state, strengths, show_progress="hidden")
    gr.on([refresh.click, *refresh_on], on_refresh_students, [picker, teacher_state], picker)
    upload.upload(partial(on_upload, store), upload, [picker, upload_status], concurrency_id="files")
    teacher_runs.append(diversity_button.click(
        partial(on_diversity, store), [prompt, seed, count, picker, source, schedule_state, steps, cfg, teacher_state],
        [teacher_grid, student_grid, diversity_text], concurrency_id="teacher",
        concurrency_limit=limits.SAMPLE_SLOTS))
    load_button.click(lambda: "Loading the teacher (a large model takes minutes)…", None, teacher_status,
                      queue=False).then(partial(on_load_teacher, store),
                                        [teacher_picker, teacher_path, height, width, frames, lora_file,
                                         lora_strength],
                                        [teacher_state, teacher_status, picker, steps, cfg, teacher_picker, image],
                                        concurrency_id="teacher", concurrency_limit=limits.SAMPLE_SLOTS)
    export_button.click(partial(on_export_student, store), [picker, export_layout, teacher_state],
                        [export_file, export_status], concurrency_id="files")
    import_button.click(partial(on_import_published, store),
                        [published, teacher_state, schedule_state, published_cfg, *strengths],
                        [picker, published_status], concurrency_id="files", concurrency_limit=1)
    # a visitor's long request can be stopped; the slot goes to the next one
    cancel_button.click(lambda: "Stopped.", None, status, cancels=teacher_runs, queue=False)
