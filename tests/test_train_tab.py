"""The Train tab's callbacks as plain functions: presets, validation messages, the gate, one real job."""
from __future__ import annotations

import os
import signal
import time
import zipfile

import pytest
import yaml
from PIL import Image

from pdmd.paths import SHIPPED_STUDENTS
from pdmd.training import jobs
from pdmd.training.config import TrainConfig
from pdmd.training.gate import Gate
from pdmd.training.jobs import JobManager
from ui import students, train
from ui.app import build_app

OPEN = Gate("on")
LOCKED = Gate("token", token="s3cret")


def skipped(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


@pytest.fixture
def manager(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    manager = JobManager(device="cpu")  # runs/jobs under the temporary runs folder, as the app makes it
    yield manager
    for job in manager.jobs():
        if jobs.is_alive(job.pid, job.pid_started):
            os.killpg(job.pid, signal.SIGKILL)


def fields(preset=train.QUICK, **changes) -> list:
    """The form's values in on_start's order (after token, name, threads), as the preset fills them."""
    names = ["teacher", "method", "schedule_source", "boundaries", "schedule_steps", "shift", "rank", "alpha",
             "updates_per_phase", "lr_generator", "lr_fake", "batch_size", "fake_ratio", "sample_prompts",
             "sample_every", "checkpoint_every"]
    values = dict(zip(names, train.preset_fields(preset)))
    values.update(changes)
    phases = {"boundaries": [0.6], "steps": [1, 3], "shift": 2.0}
    return [preset, *[values[n] for n in names[:6]], phases, *[values[n] for n in names[6:]]]


def test_presets_fill_valid_configs_and_default_is_the_shipped_student():
    default = TrainConfig.from_dict(train.form_config(*fields("default")))
    shipped = yaml.safe_load((SHIPPED_STUDENTS / "phased/config.yaml").read_text())
    steps = shipped["updates_per_phase"]
    assert default.updates_per_phase == (tuple(steps) if isinstance(steps, list) else (steps,) * 2)
    assert (default.lr_generator, default.batch_size, default.lora.rank) == (
        shipped["lr_generator"], shipped["batch_size"], shipped["lora"]["rank"])
    assert default.teacher_cfg == shipped["teacher_cfg"]  # fields outside the form come from the preset
    quick = TrainConfig.from_dict(train.form_config(*fields()))
    assert quick.total_updates < default.total_updates and quick.schedule.num_phases == 2


def test_schedule_sources():
    phases = train.form_config(*fields(schedule_source=train.FROM_PHASES))
    assert phases["schedule"] == {"boundaries": [0.6], "steps": [1, 3], "shift": 2.0}
    edited = train.form_config(*fields(schedule_source=train.EDIT_HERE, boundaries="0.8, 0.4",
                                       schedule_steps="1", shift="3"))
    assert edited["schedule"]["boundaries"] == [0.8, 0.4] and edited["schedule"]["shift"] == 3.0
    single = train.form_config(*fields(method="dmd-sgts"))  # the method's own: 1 phase x 4 steps
    assert single["schedule"]["steps"] == [4]


@pytest.mark.parametrize("changes, name, threads, message", [
    ({"lr_generator": 0}, "", 1, "lr_generator = 0 must be greater than 0"),
    ({"lr_fake": None}, "", 1, "lr_fake = None must be a number"),
    ({"batch_size": -2}, "", 1, "batch_size = -2 must be greater than 0"),
    ({"rank": 0}, "", 1, "lora.rank = 0 must be greater than 0"),
    ({"updates_per_phase": "ten"}, "", 1, "updates_per_phase[0] = 'ten' must be a number"),
    ({"updates_per_phase": "5, 5, 5"}, "", 1, "does not fit the schedule's 2 phases"),
    ({"updates_per_phase": " "}, "", 1, "updates per phase is empty"),
    ({"method": "dmd", "schedule_source": train.FROM_PHASES}, "", 1, "is single-phase"),
    ({"schedule_source": train.EDIT_HERE, "boundaries": "0.5, 1.5"}, "", 1, "boundary 1.5 must lie strictly"),
    ({}, "../escape", 1, "run name '../escape' is not allowed"),
    ({}, "a/b", 1, "no slashes"),
    ({}, "", 0, "CPU threads 0 must be a whole number from 1"),
    ({}, "", "two", "CPU threads 'two' is not a number"),
])
def test_bad_input_is_a_visible_message_and_starts_nothing(manager, changes, name, threads, message):
    text, picker = train.on_start(manager, OPEN, None, name, threads, *fields(**changes))
    assert "pdmd-error" in text and message in text and skipped(picker)
    assert manager.jobs() == []


def test_the_gate_refuses_every_request_without_the_token(manager):
    text, _ = train.on_start(manager, LOCKED, "wrong", "gated", 1, *fields())
    assert "wrong or missing training token" in text and manager.jobs() == []
    for answer in (train.on_stop(manager, LOCKED, None, 1), train.on_stop(manager, LOCKED, "", 1, force=True),
                   train.on_resume(manager, LOCKED, "nope", 1),
                   train.on_request(manager, LOCKED, "save", None, 1)):
        assert "wrong or missing training token" in answer
    off = Gate.from_env({"PDMD_TRAINING": "off"})
    assert "training is turned off" in train.on_start(manager, off, "s3cret", "x", 1, *fields())[0]


def poll_until(manager, job_id, condition, seen=None):
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        manager.poll()
        out = train.on_poll(manager, job_id, seen)
        seen = out[-1]
        if condition(manager.get(job_id)):
            return train.on_poll(manager, job_id, {})  # everything, freshly drawn
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: {manager.get(job_id).status}\n{manager.get(job_id).run.log_tail()}")


def test_a_job_from_start_to_its_student_in_compare(manager):
    tiny = dict(updates_per_phase="2", batch_size=1, fake_ratio=1, rank=2, alpha=2, sample_every=2,
                checkpoint_every=1, sample_prompts="a red circle")
    text, picker = train.on_start(manager, LOCKED, "s3cret", "first", 1, *fields(**tiny))
    assert "started (4 steps)" in text and picker["value"] == 1
    second, _ = train.on_start(manager, LOCKED, "s3cret", "second", 1, *fields(**tiny))
    assert "queued: #1 first is running" in second  # one job per device: a visible message
    assert "removed from the queue" in train.on_stop(manager, LOCKED, "s3cret", 2)
    assert manager.get(2).status == jobs.STOPPED
    assert "pdmd-error" in train.on_resume(manager, LOCKED, "s3cret", 1)  # running: nothing to resume

    (progress, generator, fake, sample, log, command, table, job_picker, download, changed, seen) = poll_until(
        manager, 1, lambda j: j.status == jobs.FINISHED)
    assert "finished · step 4/4 (100%)" in progress and "<progress value='4' max='4'" in progress
    assert list(generator["phase"].unique()) == ["phase 1", "phase 2"] and len(fake) == 4
    grid = Image.open(manager.get(1).folder / "samples" / "latest.png")
    assert sample.size == (grid.width * (192 // grid.height), 192 // grid.height * grid.height)
    assert '"finished": true' in log
    assert command == f"```bash\n{jobs.display_command(manager.get(1))}\n```"
    assert [row[3] for row in table] == ["stopped", "finished"]
    assert zipfile.ZipFile(download["value"]).namelist()
    assert str(manager.get(1).student) in [value for _, value in students.picker_choices()]

    finished_signal = train.on_poll(manager, 1, {"finished": []})[9]
    assert not skipped(finished_signal)  # a job just finished: Compare's picker re-lists its students
    assert skipped(train.on_poll(manager, 1, seen)[9])

    # a metrics line that is valid JSON without the loss keys (or garbage) never breaks a poll of the job
    with open(manager.get(1).run.metrics_file, "a") as metrics:
        metrics.write('{"step": 99999999, "phase": 7}\n{"step": "x"}\nnot json\n')
    progress, generator, *_ = train.on_poll(manager, 1, {})
    assert "#1 first" in progress and len(generator) == 5


def test_the_app_builds_with_the_train_tab(manager):
    app = build_app(manager=manager, gate=OPEN)
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"train-start", "train-stop", "train-progress", "train-jobs", "compare-student"} <= ids
    manager.stop_supervisor()
