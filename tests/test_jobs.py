"""The job manager with real ``python -m pdmd train`` processes on a tiny config.

Each trainer start costs a few seconds of imports, so the tests share launches: one job runs long (it is
always stopped), the others are a handful of steps.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time

import pytest
import yaml

from pdmd.paths import SHIPPED_STUDENTS
from pdmd.training import checkpoints
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.gate import Gate, GateClosed
from pdmd.training.job_table import SCHEMA_VERSION
from pdmd.training.jobs import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STOPPED,
    JobError,
    JobManager,
    display_command,
    is_alive,
    process_start_time,
    zip_student,
)
from pdmd.training.run_folder import CHECKPOINT_DIR, STATUS_FILE, RunFolder

WAIT_S = 180  # a generous limit for a failure message, not a speed requirement


def tiny(**overrides) -> dict:
    config = dict(teacher="builtin", method="phased", schedule={"boundaries": [0.5], "steps": [1, 1]},
                  updates_per_phase=2, batch_size=1, fake_ratio=1, lora={"rank": 2, "alpha": 2},
                  sample_every=1000, checkpoint_every=1, keep_checkpoints=2, sample_prompts=["a red circle"])
    config.update(overrides)
    return config


LONG = tiny(updates_per_phase=100_000)  # never finishes inside a test: it is always stopped


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def manager(tmp_path):
    manager = JobManager(tmp_path / "jobs", device="cpu")
    yield manager
    for job in manager.jobs():  # never leave a trainer behind
        if is_alive(job.pid, job.pid_started):
            os.killpg(job.pid, signal.SIGKILL)


def wait_for(manager: JobManager, job_id: int, condition, what: str):
    job = manager.wait(job_id, condition, WAIT_S)
    if condition(job):
        return job
    raise AssertionError(f"job {job.name} never {what}: {job.status}, step {job.step}\n{job.run.log_tail()}")


def test_queue_progress_graceful_stop_and_finish(manager):
    long = manager.submit("long", LONG)
    assert long.status == RUNNING and long.total == 200_000
    assert display_command(long) == (f"python -m pdmd train --config {long.folder}/config.yaml --output-dir "
                                     f"{long.folder} --no-progress --threads 1")
    saved = yaml.safe_load((long.folder / "config.yaml").read_text())
    assert saved["output_dir"] == str(long.folder) and saved["updates_per_phase"] == [100_000, 100_000]

    short = manager.submit("short", tiny())
    assert short.status == QUEUED  # one running job per device: the second waits

    long = wait_for(manager, long.id, lambda j: j.step >= 2, "made progress")
    assert manager.get(short.id).status == QUEUED
    manager.stop(long.id)
    long = wait_for(manager, long.id, lambda j: j.status == STOPPED, "stopped")
    assert long.error is None and long.ended and not is_alive(long.pid, long.pid_started)
    assert json.loads((long.folder / STATUS_FILE).read_text())["state"] == "stopped"
    latest = checkpoints.resolve_checkpoint(long.folder / CHECKPOINT_DIR, "latest")
    tensors, meta = checkpoints.load_checkpoint(latest)  # graceful: a loadable checkpoint of the last step
    assert meta["step"] == long.step == RunFolder(long.folder).last_step() and any(k.startswith("adapter/") for k in tensors)

    short = wait_for(manager, short.id, lambda j: j.status == FINISHED, "finished")  # the queue moved on
    assert short.step == short.total == 4
    assert [r["step"] for r in RunFolder(short.folder).metrics()] == [1, 2, 3, 4]
    assert (short.student / "manifest.json").is_file() and short.student.resolve() in manager.students()
    archive = zip_student(short, short.folder.parent / "downloads")
    import zipfile
    assert "manifest.json" in zipfile.ZipFile(archive).namelist()

    with pytest.raises(JobError, match="'short' is finished; only a stopped, interrupted or failed job"):
        manager.resume(short.id)
    with pytest.raises(JobError, match="only a finished job has a student"):
        zip_student(long, short.folder.parent / "downloads")

    # resumed, it carries on from its checkpoint; force stop kills the process group
    resumed = manager.resume(long.id)
    assert resumed.status == RUNNING and "--resume latest" in display_command(resumed)
    first = long.step
    resumed = wait_for(manager, long.id, lambda j: j.step > first, "resumed")
    pid = resumed.pid
    manager.stop(long.id, force=True)
    killed = wait_for(manager, long.id, lambda j: j.status == STOPPED, "was force-stopped")
    assert "force-stopped" in killed.error
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no process of the group is left
    assert checkpoints.resolve_checkpoint(long.folder / CHECKPOINT_DIR, "latest") is not None


def test_restarts_adopt_live_trainers_and_recover_killed_ones_which_resume_to_the_end(manager, tmp_path):
    job = manager.submit("killed", tiny(updates_per_phase=10))  # seconds left after step 2 to kill it in
    job = wait_for(manager, job.id, lambda j: j.step >= 2, "made progress")
    adopting = JobManager(tmp_path / "jobs", device="cpu")  # an app restart while the trainer runs on
    assert adopting.get(job.id).status == RUNNING  # the process outlived the app: still ours

    os.kill(job.pid, signal.SIGKILL)  # not via the manager: a crash, the OOM killer, a power cut of the trainer
    while process_start_time(job.pid) is not None:  # the kill is asynchronous
        time.sleep(0.05)
    restarted = JobManager(tmp_path / "jobs", device="cpu")  # the next restart recovers the table
    job = restarted.get(job.id)
    assert job.status == INTERRUPTED and "resume it" in job.error
    assert job.step >= 2 and job.pid is None

    job = restarted.resume(job.id)
    job = wait_for(restarted, job.id, lambda j: j.status == FINISHED, "finished after resuming")
    assert job.step == job.total == 20
    assert [r["step"] for r in RunFolder(job.folder).metrics()] == list(range(1, 21))
    assert json.loads((job.student / "manifest.json").read_text())["updates_trained"] == 20


def test_a_crashing_trainer_fails_with_its_last_log_lines_and_cannot_resume(manager):
    job = manager.submit("crash", tiny(teacher="no-such-teacher"))  # valid config, fails when it loads
    job = wait_for(manager, job.id, lambda j: j.status == FAILED, "failed")
    assert re.search(r"python -m pdmd train: error: .*'no-such-teacher'", job.error)  # the log's last lines
    with pytest.raises(JobError, match="has no checkpoint to resume from"):
        manager.resume(job.id)


@pytest.mark.parametrize("name, config, message", [
    ("../evil", tiny(), "run name '../evil' is not allowed"),
    ("a/b", tiny(), "no slashes"),
    ("", tiny(), "run name '' is not allowed"),
    ("ok", tiny(lr_generator=0), "lr_generator = 0 must be greater than 0"),
    ("ok", tiny(batch_size="eight"), "batch_size = 'eight' must be a number"),
    ("ok", tiny(updates_per_phase=[2, 2, 2]), "does not fit the schedule's 2 phases"),
    ("ok", tiny(lora={"rank": -1, "alpha": 2}), "lora.rank = -1 must be greater than 0"),
])
def test_bad_requests_are_refused_before_anything_is_written(manager, name, config, message):
    with pytest.raises((JobError, ConfigError), match=message.replace("(", r"\(").replace("[", r"\[")):
        manager.submit(name, config)
    assert manager.jobs() == [] and [p.name for p in manager.root.iterdir() if p.is_dir()] == []


def test_a_taken_name_and_unknown_jobs_are_refused(manager):
    with pytest.raises(JobError, match="no job #7"):
        manager.resume(7)
    (manager.root / "taken").mkdir()
    (manager.root / "taken" / "keep.txt").write_text("precious")
    with pytest.raises(JobError, match="a job named 'taken' already exists"):
        manager.submit("taken", tiny())
    assert (manager.root / "taken" / "keep.txt").read_text() == "precious"


def test_the_gate():
    assert Gate.from_env({}).mode == "on"
    assert Gate.from_env({"SPACE_ID": "me/space"}).mode == "off"  # a public Space is closed unless opened
    assert Gate.from_env({"SPACE_ID": "me/space", "PDMD_TRAINING": "on"}).mode == "on"
    Gate.from_env({}).check(None)
    off = Gate.from_env({"PDMD_TRAINING": "off"})
    with pytest.raises(GateClosed, match="training is turned off"):
        off.check("anything")
    gate = Gate.from_env({"PDMD_TRAINING": "token", "PDMD_TRAIN_TOKEN": "s3cret"})
    assert "needs the token" in gate.describe()
    gate.check("s3cret")
    for wrong in (None, "", "s3cre", "s3cret "):
        with pytest.raises(GateClosed, match="wrong or missing training token"):
            gate.check(wrong)
    assert Gate.from_env({"PDMD_TRAINING": "token"}).mode == "off"  # no token configured: closed
    assert "is not on, off or token" in Gate.from_env({"PDMD_TRAINING": "yes"}).describe()


def _adopted(manager: JobManager, name: str):
    return next(job for job in manager.jobs() if job.name == name)


def test_a_damaged_or_deleted_jobs_table_is_rebuilt_with_the_running_trainer_adopted(manager, tmp_path):
    finished = wait_for(manager, manager.submit("short", tiny()).id, lambda j: j.finished, "finished")
    running = wait_for(manager, manager.submit("long", LONG).id, lambda j: j.step >= 1, "made progress")
    assert running.status == RUNNING and finished.finished
    database = tmp_path / "jobs" / "jobs.sqlite"

    # deleted while the app runs: the next poll rebuilds the table; the trainer is still ours
    for path in tmp_path.glob("jobs/jobs.sqlite*"):
        path.unlink()
    manager.poll()
    assert "no jobs table" in manager.table.notice and "2 job(s) rebuilt" in manager.table.notice
    assert _adopted(manager, "long").status == RUNNING and _adopted(manager, "long").pid == running.pid
    assert _adopted(manager, "short").status == FINISHED

    # damaged, then the app restarts: it starts, moves the file aside, adopts the trainer, starts nothing beside it
    for path in tmp_path.glob("jobs/jobs.sqlite-*"):
        path.unlink()
    database.write_bytes(b"not a database " * 1000)
    restarted = JobManager(tmp_path / "jobs", device="cpu")
    assert "damaged" in restarted.table.notice and "moved aside" in restarted.table.notice
    assert list(tmp_path.glob("jobs/jobs.sqlite.damaged-*"))  # kept for a person to look at
    adopted = _adopted(restarted, "long")
    assert adopted.status == RUNNING and adopted.pid == running.pid
    assert restarted.submit("another", tiny()).status == QUEUED  # one job per device, even after the loss
    restarted.stop(adopted.id, force=True)


def test_a_job_from_a_student_passes_its_flags_keeps_them_on_resume_and_in_a_rebuilt_table(manager, tmp_path):
    student = str((SHIPPED_STUDENTS / "phased").resolve())  # a shipped student: no training run to wait for
    assert student in map(str, manager.students())
    shipped = TrainConfig.from_yaml(SHIPPED_STUDENTS / "phased" / "config.yaml")
    fits = tiny(updates_per_phase=[2, 100_000], schedule={"boundaries": list(shipped.schedule.boundaries),
                                                          "steps": list(shipped.schedule.steps),
                                                          "shift": shipped.schedule.shift},
                lora={"rank": shipped.lora.rank, "alpha": shipped.lora.alpha})
    job = manager.submit("phase2", fits, from_student=student, start_phase=2)
    flags = "--from-student assets/students/phased --start-phase 2"  # shown as typed in the repository root
    assert flags in display_command(job) and RunFolder(job.folder).from_student() == {"student": student,
                                                                                       "start_phase": 2}
    job = wait_for(manager, job.id, lambda j: j.step >= 3, "trained phase 2")  # phase 1 kept: it starts at step 2
    assert RunFolder(job.folder).metrics()[0]["step"] == 3
    manager.stop(job.id)
    stopped = wait_for(manager, job.id, lambda j: j.status == STOPPED, "stopped")
    resumed = manager.resume(job.id)
    assert display_command(resumed).endswith(f"{flags} --resume latest")
    wait_for(manager, job.id, lambda j: j.step > stopped.step, "resumed")
    manager.stop(job.id, force=True)
    wait_for(manager, job.id, lambda j: j.status == STOPPED, "was force-stopped")

    for path in tmp_path.glob("jobs/jobs.sqlite*"):  # lost: the rebuilt row still trains on from the student
        path.unlink()
    rebuilt = _adopted(JobManager(tmp_path / "jobs", device="cpu"), "phase2")
    assert (rebuilt.from_student, rebuilt.start_phase) == (student, 2) and flags in display_command(rebuilt)


@pytest.mark.parametrize("student, start_phase, message", [
    ("/etc", 2, "not one this app serves"),
    ("", 2, "pick the student to retrain from"),
    (None, 2, "pick the student to retrain from"),
    (str(SHIPPED_STUDENTS / "phased"), 0, "must be a whole number from 2 to"),
    (str(SHIPPED_STUDENTS / "phased"), True, "must be a whole number from 2 to"),
])
def test_a_job_from_an_unserved_student_or_a_bad_phase_is_refused_before_anything_is_written(manager, student,
                                                                                            start_phase, message):
    with pytest.raises(JobError, match=message):
        manager.submit("refused", tiny(), from_student=student, start_phase=start_phase)
    assert manager.jobs() == [] and [p.name for p in manager.root.iterdir() if p.is_dir()] == []


VERSION_1_SCHEMA = """CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL, status TEXT NOT NULL, device TEXT NOT NULL, threads INTEGER NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0, requested TEXT, pid INTEGER, pid_started INTEGER, created REAL NOT NULL,
    started REAL, ended REAL, step INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL, error TEXT)"""


def test_a_version_1_table_gains_the_new_columns_and_its_rows_keep_working(tmp_path):
    root = tmp_path / "jobs"
    (root / "old").mkdir(parents=True)
    config = TrainConfig.from_dict(tiny(), output_dir=str(root / "old")).as_dict()
    with sqlite3.connect(root / "jobs.sqlite") as db:
        db.execute(VERSION_1_SCHEMA)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO jobs (name, config, status, device, threads, resume, created, step, total, error) "
                   "VALUES ('old', ?, 'stopped', 'cpu', 1, 1, 0, 2, 4, NULL)", (json.dumps(config),))
    db.close()
    old = JobManager(root, device="cpu").get(1)
    assert (old.name, old.status, old.step, old.from_student, old.start_phase) == ("old", STOPPED, 2, None, None)
    assert "--from-student" not in display_command(old) and display_command(old).endswith("--resume latest")
    with sqlite3.connect(root / "jobs.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert {"from_student", "start_phase"} <= {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    db.close()
