"""Train tab: distil a student in a background job (exactly ``python -m pdmd train``), watch it, control it.

Jobs belong to pdmd.training.jobs.JobManager, which the app polls on a supervisor thread; this tab only submits
requests and shows what the manager recorded, refreshed by a timer that reads files and the job table (never
waits for training). Every request passes the gate (PDMD_TRAINING / PDMD_TRAIN_TOKEN) on the server.
"""
from __future__ import annotations

import html
import time
from functools import partial
from pathlib import Path

import gradio as gr
from PIL import Image

from pdmd.core.distill import METHODS
from pdmd.core.schedule import ScheduleError
from pdmd.students import StudentError
from pdmd.students.manifest import MANIFEST
from pdmd.training import jobs
from pdmd.training.config import ConfigError
from pdmd.training.from_student import student_name
from pdmd.training.gate import Gate, GateClosed
from pdmd.training.jobs import JobError, JobManager
from ui import comparison
from ui.inputs import InputError, error_markdown
from ui.teacher_picker import SUGGESTED_TEACHERS, supported_pipelines
from ui.train_curves import duration, loss_frames, probe_frames, probe_line
from ui.train_form import (
    EDIT_HERE,
    FORM_FIELDS,
    FROM_PHASES,
    METHOD_DEFAULT,
    PRESET_FILES,
    QUICK,
    check_threads,
    form_config,
    new_run_name,
    preset_fields,
)
from ui.train_publish import build_publish_row
from ui.train_retrain import build_retrain_row

POLL_SECONDS = 1.5
PLOT_EVERY_S = 4.0   # the loss and probe plots redraw at most this often: the page stays light while a job trains
LOG_LINES = 30
DOWNLOAD_DIR = comparison.DOWNLOAD_DIR / "students"  # cleaned with the rest of the app's downloads
USER_ERRORS = (JobError, GateClosed, ConfigError, ScheduleError, InputError, StudentError)
JOB_HEADERS = ["#", "name", "method", "status", "step", "created", "ended", "note"]


def on_preset(name):
    """Fill the form with a preset. An unknown name (posted to the API) or a file that does not read changes
    nothing: Start then reports the problem as one line."""
    try:
        return preset_fields(name)
    except (JobError, ConfigError, ScheduleError):
        return [gr.skip()] * len(FORM_FIELDS)


# --- requests (each one passes the gate first) --------------------------------------------------------
def on_start(manager: JobManager, gate: Gate, token, name, threads, *fields):
    """Outputs: message, the job picker (selects the new job)."""
    return _submit(manager, gate, token, name, threads, fields, {})


def on_retrain(manager: JobManager, gate: Gate, token, name, threads, student, start_phase, *fields):
    """A job that keeps ``student``'s experts before ``start_phase`` and trains on with the form's config.
    Outputs: message, the job picker."""
    # nothing picked is still a retrain request ("" not None), which the manager refuses: never a full-run job
    return _submit(manager, gate, token, name, threads, fields,
                   {"from_student": "" if student is None else student, "start_phase": start_phase})


def _submit(manager: JobManager, gate: Gate, token, name, threads, fields, retrain: dict):
    try:
        gate.check(token)
        config = form_config(*fields)
        name = (name or "").strip() or new_run_name(config["method"])
        job = manager.submit(name, config, threads=check_threads(threads), **retrain)
    except USER_ERRORS as err:
        return error_markdown(str(err)), gr.skip()
    kept = f"; phases before {job.start_phase} kept from {_origin(job)}" if job.from_student else ""
    if job.status == jobs.QUEUED:
        running = manager.running()
        message = (f"⏳ Job #{job.id} **{job.name}** is queued{kept}: #{running.id} {running.name} is running on "
                   f"{manager.device} (one job per device); it starts when that one ends.")
    else:
        message = f"✓ Job #{job.id} **{job.name}** started ({job.total} steps{kept})."
    return message, gr.update(choices=job_choices(manager.jobs()), value=job.id)


def _origin(job: jobs.Job) -> str:
    return student_name(Path(job.from_student))


def on_stop(manager: JobManager, gate: Gate, token, job_id, force: bool = False) -> str:
    try:
        gate.check(token)
        job = manager.stop(job_id, force=force)
    except USER_ERRORS as err:
        return error_markdown(str(err))
    if job.status == jobs.STOPPED:
        return f"**{job.name}** {job.error or 'stopped'}."
    if force:
        return f"Force-stopped **{job.name}**: its process group was killed; the latest checkpoint is kept."
    return f"Stopping **{job.name}**: it saves a checkpoint after its current step, then exits."


def on_resume(manager: JobManager, gate: Gate, token, job_id) -> str:
    try:
        gate.check(token)
        job = manager.resume(job_id)
    except USER_ERRORS as err:
        return error_markdown(str(err))
    checkpoint = jobs.latest_checkpoint(job)
    where = f"from {checkpoint.name}" if checkpoint else "from its checkpoint"
    return f"Resuming **{job.name}** {where} ({job.status})."


def on_request(manager: JobManager, gate: Gate, action: str, token, job_id) -> str:
    try:
        gate.check(token)
        job = manager.request(job_id, action)
    except USER_ERRORS as err:
        return error_markdown(str(err))
    what = "draws its sample grid" if action == "sample" else "saves a checkpoint"
    return f"**{job.name}** {what} after its current step."


# --- what the timer shows ---------------------------------------------------------------------------------
def job_choices(all_jobs: list[jobs.Job]) -> list[tuple[str, int]]:
    return [(f"#{job.id} {job.name}", job.id) for job in all_jobs]


def _when(stamp: float | None) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else ""


def job_table(all_jobs: list[jobs.Job]) -> list[list]:
    return [[job.id, job.name, job.config.get("method", "?"), job.status, f"{job.step}/{job.total}",
             _when(job.created), _when(job.ended), job.error.splitlines()[-1][:120] if job.error else ""]
            for job in all_jobs]


def progress_html(job: jobs.Job, rows: list[dict], probes: list[dict]) -> str:
    """A progress bar with step/total, phase, percentage and ETA, the latest probe figures, and the job's status
    and note."""
    percent = 100 * job.step / max(job.total, 1)
    phase = f" · phase {rows[-1]['phase']}/{len(job.config['updates_per_phase'])}" if rows else ""
    eta = jobs.eta_seconds(job, rows)
    eta_text = f" · ETA {duration(eta)}" if eta is not None else ""
    kept = (f"<div>phases before {job.start_phase} kept from {html.escape(_origin(job))}</div>"
            if job.from_student else "")
    probe = f"<div id='train-probe-text'>{html.escape(probe_line(probes))}</div>" if probes else ""
    note = (f"<pre style='white-space:pre-wrap;max-height:12em;overflow:auto'>{html.escape(job.error)}</pre>"
            if job.error else "")
    return (f"<div id='train-progress-text'><b>#{job.id} {html.escape(job.name)}</b> — {job.status} · "
            f"step {job.step}/{job.total} ({percent:.0f}%){phase}{eta_text}</div>{kept}{probe}"
            f"<progress value='{job.step}' max='{job.total}' style='width:100%;height:1.2em'></progress>{note}")


def enlarged(path: Path, height: int = 192) -> Image.Image:
    """The sample grid, tiny 32-pixel tiles scaled up (nearest: pixels stay sharp) so they can be seen."""
    with Image.open(path) as image:
        factor = max(1, height // image.height)
        return image.convert("RGB").resize((image.width * factor, image.height * factor), Image.NEAREST)


def student_download(job: jobs.Job) -> str:
    """The finished student as a zip (made once per finish), for the download button."""
    archive = DOWNLOAD_DIR / f"{job.name}-student.zip"
    manifest = job.student / MANIFEST
    if not archive.is_file() or archive.stat().st_mtime < manifest.stat().st_mtime:
        jobs.zip_student(job, DOWNLOAD_DIR)
    return str(archive)


def on_poll(manager: JobManager, job_value, seen: dict | None):
    """Outputs: progress, generator-loss plot, fake-loss plot, adherence plot, FD plot, latest samples, log tail,
    command, job table, job picker, download button, the students-changed signal (Compare's picker listens), seen.
    Only what changed since the last tick is sent."""
    seen = dict(seen or {})
    keep = gr.skip()
    all_jobs = manager.jobs()
    signature = [(j.id, j.status, j.step) for j in all_jobs]
    table = keep if seen.get("table") == signature else job_table(all_jobs)
    ids = [j.id for j in all_jobs]
    picker = keep
    if seen.get("ids") != ids:  # a new job: list it, and show the newest unless one is picked
        job_value = job_value if job_value in ids else (ids[0] if ids else None)
        picker = gr.update(choices=job_choices(all_jobs), value=job_value)
    finished = sorted(j.id for j in all_jobs if j.finished)
    students_changed = keep if seen.get("finished", finished) == finished else time.time()
    seen.update(table=signature, ids=ids, finished=finished)
    job = next((j for j in all_jobs if j.id == job_value), None)
    if job is None:
        return ("<i>No job yet: pick a preset and press Start.</i>", keep, keep, keep, keep, keep, "", "", table,
                picker, gr.update(visible=False), students_changed, seen)

    rows, probes = job.run.metrics(), job.run.probes()
    fresh = seen.get("job") != job.id
    state = (job.id, job.status, job.step, job.error, len(probes))
    progress = keep if not fresh and seen.get("state") == state else progress_html(job, rows, probes)
    plots = (keep,) * 4
    drawn = (job.id, job.step, len(probes))  # a probe row can come after the last step
    if fresh or (seen.get("plotted") != drawn
                 and (time.time() - seen.get("plotted_at", 0) > PLOT_EVERY_S or job.status != jobs.RUNNING)):
        plots = (*loss_frames(rows), *(gr.update(value=frame, visible=bool(probes))
                                      for frame in probe_frames(probes)))
        seen.update(plotted=drawn, plotted_at=time.time())
    sample_path = job.run.latest_sample
    sample_mtime = sample_path.stat().st_mtime if sample_path.is_file() else None
    sample = keep if not fresh and seen.get("sample") == sample_mtime else (
        enlarged(sample_path) if sample_mtime else None)
    log_path = job.run.log_file
    log_size = log_path.stat().st_size if log_path.is_file() else 0
    log = keep if not fresh and seen.get("log") == log_size else job.run.log_tail(LOG_LINES)
    command = keep if not fresh else f"```bash\n{jobs.display_command(job)}\n```"
    download = keep
    if fresh or seen.get("download") != (job.id, job.finished, job.ended):
        # a finished job whose student folder was deleted has nothing to download (and must not break the poll)
        download = (gr.update(value=student_download(job), visible=True) if job.finished and job.run.has_student()
                    else gr.update(value=None, visible=False))
    seen.update(job=job.id, state=state, sample=sample_mtime, log=log_size, download=(job.id, job.finished, job.ended))
    return (progress, *plots, sample, log, command, table, picker, download, students_changed, seen)


# --- layout ------------------------------------------------------------------------------------------------
def build_train_tab(manager: JobManager, gate: Gate, schedule_state: gr.State, students_changed: gr.State) -> dict:
    """The form, the controls and the live view of the selected job; returns the main components."""
    repaired = f"\n\n⚠️ {manager.table.notice}." if manager.table.notice else ""  # a rebuilt jobs table says so
    gr.Markdown(gate.describe() + repaired, elem_id="train-gate")
    defaults = preset_fields(QUICK)
    usable = gate.mode != "off"
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                preset = gr.Dropdown(list(PRESET_FILES), value=QUICK, label="Preset", elem_id="train-preset",
                                     info=" · ".join(f"{name}: configs/{path.name}"
                                                     for name, path in PRESET_FILES.items()))
                name = gr.Textbox(label="Run name", placeholder="empty: <method>-<date>-<time>",
                                  elem_id="train-name", info="letters, digits, - and _ (runs/jobs/<name>/)")
            with gr.Row():
                teacher = gr.Dropdown(["builtin", *SUGGESTED_TEACHERS], value=defaults[0], allow_custom_value=True,
                                      label="Teacher", elem_id="train-teacher",
                                      info="builtin, or a diffusers pipeline folder / Hub id; pipelines: "
                                           f"{supported_pipelines()}")
                method = gr.Radio(list(METHODS), value=defaults[1], label="Method", elem_id="train-method")
            schedule_source = gr.Radio([METHOD_DEFAULT, FROM_PHASES, EDIT_HERE], value=defaults[2],
                                       label="Schedule")
            with gr.Row():
                boundaries = gr.Textbox(defaults[3], label="Boundaries (edit here)")
                schedule_steps = gr.Textbox(defaults[4], label="Steps per phase of the sampler")
                shift = gr.Textbox(defaults[5], label="Shift")
            with gr.Row():
                rank = gr.Number(defaults[6], label="LoRA rank", precision=0, minimum=1)
                alpha = gr.Number(defaults[7], label="LoRA alpha", minimum=0)
                updates_per_phase = gr.Textbox(defaults[8], label="Training updates per phase",
                                             info="one number, or one per phase: 100, 200", elem_id="train-steps")
            with gr.Row():
                lr_generator = gr.Number(defaults[9], label="Generator learning rate", elem_id="train-lr")
                lr_fake = gr.Number(defaults[10], label="Fake-score learning rate")
                batch_size = gr.Number(defaults[11], label="Batch", precision=0)
                fake_ratio = gr.Number(defaults[12], label="Fake updates per generator update", precision=0)
            sample_prompts = gr.Textbox(defaults[13], label="Sample prompts (one per line)", lines=3,
                                        info="empty for a run on condition images: its grid shows the first ones")
            with gr.Accordion("Conditioned teachers (image-to-video, editing)", open=False):
                with gr.Row():
                    condition_images = gr.Textbox(
                        defaults[16], label="Condition images", lines=2, elem_id="train-condition-images",
                        info="a folder on this machine (its prompts.txt: one prompt per image, in name order), or "
                             "one image file a line")
                    condition_teacher = gr.Textbox(
                        defaults[17], label="Without images, drawn by", elem_id="train-condition-teacher",
                        info="self (the teacher's own images), a text-to-image teacher's folder / Hub id, or none "
                             "(text-only); empty: the teacher's default")
            with gr.Row():
                sample_every = gr.Number(defaults[14], label="Sample every (steps)", precision=0)
                checkpoint_every = gr.Number(defaults[15], label="Checkpoint every (steps)", precision=0)
                threads = gr.Number(jobs.default_threads(), label="CPU threads", precision=0, minimum=1, elem_id="train-threads",
                                    info="1 keeps the other core free for the app")
            token = gr.Textbox(label="Training token", type="password", visible=gate.mode == "token",
                               elem_id="train-token")
            with gr.Row():  # greyed out when training is off; the handlers check the gate regardless
                start = gr.Button("Start", variant="primary", elem_id="train-start", interactive=usable)
                stop = gr.Button("Stop", elem_id="train-stop", interactive=usable)
                kill = gr.Button("Force stop", variant="stop", elem_id="train-kill", interactive=usable)
                resume = gr.Button("Resume", elem_id="train-resume", interactive=usable)
                sample_now = gr.Button("Sample now", interactive=usable)
                save_now = gr.Button("Save now", interactive=usable)
            retrain_student, retrain_phase, retrain = build_retrain_row(manager, usable, students_changed)
            message = gr.Markdown(elem_id="train-message")
        with gr.Column(scale=3):
            job = gr.Dropdown(job_choices(manager.jobs()), value=None, label="Job", elem_id="train-job")
            progress = gr.HTML(elem_id="train-progress")
            command = gr.Markdown(elem_id="train-command")
            with gr.Row():
                generator_plot = gr.LinePlot(x="step", y="loss", color="phase", label="Generator loss (DMD)",
                                             height=220)
                fake_plot = gr.LinePlot(x="step", y="loss", color="phase", label="Fake-score loss", height=220)
            with gr.Row():  # shown once the trainer has measured the student on the probe set
                adherence_plot = gr.LinePlot(x="seconds", y="adherence", label="Probe adherence (training seconds)",
                                             height=180, visible=False, elem_id="train-adherence")
                fd_plot = gr.LinePlot(x="seconds", y="fd", label="Probe FD (training seconds)", height=180,
                                      visible=False, elem_id="train-fd")
            sample = gr.Image(label="Latest samples", type="pil", interactive=False, elem_id="train-sample")
            download = gr.DownloadButton("Download student (.zip)", visible=False, elem_id="train-download")
            build_publish_row(manager, gate, job)  # the model card; a Hub push where training is open
    log = gr.Textbox(label="Log (tail)", lines=10, max_lines=10, interactive=False, autoscroll=True,
                     elem_id="train-log")
    table = gr.Dataframe(headers=JOB_HEADERS, value=job_table(manager.jobs()) or None, interactive=False,
                         label="Jobs", elem_id="train-jobs")

    fields = [preset, teacher, method, schedule_source, boundaries, schedule_steps, shift, schedule_state, rank,
              alpha, updates_per_phase, lr_generator, lr_fake, batch_size, fake_ratio, sample_prompts,
              sample_every, checkpoint_every, condition_images, condition_teacher]
    preset_outputs = [teacher, method, schedule_source, boundaries, schedule_steps, shift, rank, alpha,
                      updates_per_phase, lr_generator, lr_fake, batch_size, fake_ratio, sample_prompts,
                      sample_every, checkpoint_every, condition_images, condition_teacher]
    preset.change(on_preset, preset, preset_outputs)
    start.click(partial(on_start, manager, gate), [token, name, threads, *fields], [message, job],
                concurrency_limit=None)
    retrain.click(partial(on_retrain, manager, gate),
                  [token, name, threads, retrain_student, retrain_phase, *fields], [message, job],
                  concurrency_limit=None)
    stop.click(partial(on_stop, manager, gate), [token, job], message, concurrency_limit=None)
    kill.click(partial(on_stop, manager, gate, force=True), [token, job], message, concurrency_limit=None)
    resume.click(partial(on_resume, manager, gate), [token, job], message, concurrency_limit=None)
    sample_now.click(partial(on_request, manager, gate, "sample"), [token, job], message, concurrency_limit=None)
    save_now.click(partial(on_request, manager, gate, "save"), [token, job], message, concurrency_limit=None)

    seen = gr.State({})
    timer = gr.Timer(POLL_SECONDS)
    # every open page polls: no queue slot is held, so a page never waits behind another one's work
    timer.tick(partial(on_poll, manager), [job, seen],
               [progress, generator_plot, fake_plot, adherence_plot, fd_plot, sample, log, command, table, job,
                download, students_changed, seen], concurrency_limit=None, show_progress="hidden")
    job.change(lambda: {}, None, seen)  # a new selection redraws everything on the next tick
    return {"job": job, "message": message, "progress": progress, "timer": timer}
