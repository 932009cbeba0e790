"""Background distillation jobs: each one a ``python -m pdmd train`` process, recorded in SQLite.

A job lives in ``runs/jobs/<name>/`` (config.yaml, train.log and the trainer's run folder: metrics.jsonl,
samples/, checkpoints/, status.json and, when finished, student/ -- which Compare's picker finds). The table
``runs/jobs/jobs.sqlite`` outlives the app: on start, a job marked running whose process is gone becomes
``interrupted`` (or ``failed``/``stopped``/``finished``, from the trainer's status.json) and can be resumed
from its latest checkpoint. One job runs per device; the others wait in a queue.

Nothing here needs the app: ``poll()`` does all the bookkeeping (the app calls it from a supervisor thread;
tests call it directly). A process is identified by its pid *and* its start time, so a pid the kernel
reused for another program is never mistaken for our trainer (nor killed).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from pdmd.paths import ROOT, SHIPPED_STUDENTS, jobs_dir
from pdmd.students import StudentError
from pdmd.students.manifest import MANIFEST
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.from_student import served_start
from pdmd.training.job_table import (
    ACTIVE,
    FAILED,
    FINISHED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STOPPED,
    STOPPING,
    Job,
    JobTable,
)
from pdmd.training.processes import default_device, default_threads, is_alive, process_start_time
from pdmd.training.run_folder import RunFolder

ERROR_LOG_LINES = 15
LAUNCH_GRACE_S = 30  # a running job without a pid yet is being started by some app, not dead
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

RESUMABLE = (STOPPED, INTERRUPTED, FAILED)
ACTIONS = ("sample", "save")                   # requests to a running trainer besides stop


class JobError(ValueError):
    """A request the job manager refuses; the message says why and what to do instead."""


class JobManager:
    def __init__(self, root: Path | None = None, device: str | None = None, python: str = sys.executable):
        self.root = Path(root or jobs_dir()).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.device = device or default_device()
        self.python = python
        self._processes: dict[int, subprocess.Popen] = {}  # children of this process, reaped by poll()
        self._lock = threading.RLock()
        self._supervisor: threading.Thread | None = None
        self._halt = threading.Event()
        self.table = JobTable(self.root, self.device)
        self.poll()  # recovery: jobs whose process died with the previous app, and the queue

    # --- storage -------------------------------------------------------------------------------------------
    def _connect(self):
        return self.table.connect()

    def _job(self, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["config"] = json.loads(data["config"])
        data["resume"] = bool(data["resume"])
        return Job(**data, folder=self.root / data["name"])

    def _update(self, job_id: int, **values) -> None:
        columns = ", ".join(f"{k} = ?" for k in values)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*values.values(), job_id))

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        with self._connect() as db:
            return [self._job(r) for r in db.execute("SELECT * FROM jobs ORDER BY id DESC")]

    def get(self, job_id) -> Job:
        try:
            job_id = int(job_id)
        except (TypeError, ValueError):
            raise JobError(f"pick a job (got {job_id!r})") from None
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"there is no job #{job_id}")
        return self._job(row)

    def running(self) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE device = ? AND status IN (?, ?) ORDER BY id",
                             (self.device, *ACTIVE)).fetchone()
        return self._job(row) if row else None

    # --- requests ------------------------------------------------------------------------------------------
    def submit(self, name: str, config: dict, threads: int | None = None, from_student=None,
               start_phase=None) -> Job:
        """Validate, write runs/jobs/<name>/config.yaml and queue the job (it starts now if the device is free).
        With ``from_student`` (one of ``students()``) and ``start_phase`` K, the job keeps that student's experts
        1..K-1 and trains from phase K on. Raises JobError / ConfigError naming the problem; nothing is written
        then."""
        name = check_name(name)
        folder = self.root / name
        validated = TrainConfig.from_dict(dict(config), output_dir=str(folder))  # ConfigError names the field
        threads = default_threads() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise JobError(f"threads = {threads!r} must be a whole number of at least 1")
        student = None
        if from_student is not None or start_phase is not None:
            try:
                student, start_phase = served_start(validated, from_student, start_phase, self.students())
            except (ConfigError, StudentError) as err:
                raise JobError(str(err)) from None
        with self._lock, self._connect() as db:
            if db.execute("SELECT 1 FROM jobs WHERE name = ?", (name,)).fetchone() or folder.exists():
                raise JobError(f"a job named {name!r} already exists: resume it, or pick another name")
            folder.mkdir(parents=True)
            run = RunFolder(folder)
            run.config_file.write_text(yaml.safe_dump(validated.as_dict(), sort_keys=False))
            if student is not None:
                run.write_from_student(student, start_phase)
            cursor = db.execute(
                "INSERT INTO jobs (name, config, status, device, threads, created, total, from_student, start_phase)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (name, json.dumps(validated.as_dict()), QUEUED, self.device, threads, time.time(),
                 validated.total_updates, student, start_phase))
            job_id = cursor.lastrowid
        self.poll()
        return self.get(job_id)

    def students(self) -> list[Path]:
        """The students a job may train on from: the shipped ones and this manager's finished jobs' -- never a
        folder a request names (the trainer would read any path)."""
        shipped = sorted(m.parent.resolve() for m in SHIPPED_STUDENTS.glob(f"*/{MANIFEST}"))
        return shipped + [job.student.resolve() for job in self.jobs() if job.finished and job.run.has_student()]

    def stop(self, job_id, force: bool = False) -> Job:
        """Graceful: control.json + SIGTERM, the trainer checkpoints and exits after its current step.
        Force: SIGKILL to the whole process group (the latest checkpoint stays). A queued job is just dropped
        from the queue."""
        with self._lock:
            job = self.get(job_id)
            if job.status == QUEUED:
                self._update(job.id, status=STOPPED, ended=time.time(), error="removed from the queue")
                return self.get(job.id)
            if job.status not in ACTIVE:
                raise JobError(f"job {job.name!r} is {job.status}, not running: nothing to stop")
            if not is_alive(job.pid, job.pid_started):
                self.poll()
                return self.get(job.id)
            if force:
                self._update(job.id, requested="kill", status=STOPPING)
                os.killpg(job.pid, signal.SIGKILL)  # start_new_session made the trainer its group's leader
            else:
                self._update(job.id, requested="stop", status=STOPPING)
                job.run.request("stop")
                os.kill(job.pid, signal.SIGTERM)
        return self.get(job.id)

    def wait(self, job_id, condition, timeout: float, interval: float = 0.2) -> Job:
        """Poll until ``condition(job)`` holds, the job ends some other way, or ``timeout`` seconds pass; the job
        as it then is (the caller tells which from the job)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            job = self.get(job_id)
            if condition(job) or job.status not in (QUEUED, *ACTIVE) or time.monotonic() >= deadline:
                return job
            time.sleep(interval)

    def request(self, job_id, action: str) -> Job:
        """"sample" (draw the sample grid now) or "save" (checkpoint now) on a running job."""
        if action not in ACTIONS:
            raise JobError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
        job = self.get(job_id)
        if job.status != RUNNING:
            raise JobError(f"job {job.name!r} is {job.status}: {action} needs a running job")
        job.run.request(action)
        return job

    def resume(self, job_id) -> Job:
        """Queue a stopped, interrupted or failed job again; it continues from its latest checkpoint."""
        with self._lock:
            job = self.get(job_id)
            if job.status not in RESUMABLE:
                raise JobError(f"job {job.name!r} is {job.status}; only a stopped, interrupted or failed job "
                               "can be resumed")
            if latest_checkpoint(job) is None:
                raise JobError(f"job {job.name!r} has no checkpoint to resume from (it stopped before its "
                               "first one): start a new job instead")
            self._update(job.id, status=QUEUED, resume=1, requested=None, error=None, ended=None)
        self.poll()
        return self.get(job.id)

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Reap ended trainers, record progress, and start the next queued job when the device is free."""
        with self._lock:
            for job in self.jobs():
                if job.status in ACTIVE:
                    self._check(job)
            job = self._claim_next()
            if job is not None:
                self._launch(job)

    def _claim_next(self) -> Job | None:
        """The oldest queued job, marked running in one transaction if the device is free -- so two apps on
        one runs folder never start two jobs on one device."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                busy = db.execute("SELECT 1 FROM jobs WHERE device = ? AND status IN (?, ?)",
                                  (self.device, *ACTIVE)).fetchone()
                row = None if busy else db.execute(
                    "SELECT * FROM jobs WHERE status = ? AND device = ? ORDER BY id LIMIT 1",
                    (QUEUED, self.device)).fetchone()
                if row is not None:
                    db.execute("UPDATE jobs SET status = ?, pid = NULL, started = ? WHERE id = ?",
                               (RUNNING, time.time(), row["id"]))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self._job(row) if row is not None else None

    def _check(self, job: Job) -> None:
        process = self._processes.get(job.id)
        if process is not None:
            code = process.poll()
            alive = code is None
        elif job.pid is None and time.time() - (job.started or 0) < LAUNCH_GRACE_S:
            return  # another app claimed it a moment ago and is starting its process
        else:  # started by an earlier app: only /proc can tell
            code, alive = None, is_alive(job.pid, job.pid_started)
        step = job.run.last_step() or job.step
        if alive:
            if step != job.step:
                self._update(job.id, step=step)
            return
        self._processes.pop(job.id, None)
        status, error = self._ending(job, code)
        self._update(job.id, status=status, error=error, step=step, ended=time.time(), pid=None, pid_started=None)

    def _ending(self, job: Job, code: int | None) -> tuple[str, str | None]:
        """The status a job ends in: the trainer's own word (status.json) first, then the exit code."""
        state = job.run.status().get("state")
        if state == FINISHED:
            return FINISHED, None
        if state == STOPPED:
            return STOPPED, None
        if job.requested == "kill":
            return STOPPED, f"force-stopped at step {job.run.last_step()}; resume continues from the latest checkpoint"
        tail = job.run.log_tail(ERROR_LOG_LINES)
        if state == FAILED or (code is not None and code > 0):
            return FAILED, tail or f"the trainer exited with code {code}"
        if job.requested == "stop":  # SIGTERM arrived before the trainer could catch it (still loading)
            return STOPPED, None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else "ended without a word"
        if code is None and "Traceback (most recent call last)" in tail:
            return FAILED, tail
        return INTERRUPTED, f"the trainer process {how} (app restart, out of memory or a kill?); resume it"

    def _launch(self, job: Job) -> None:
        job.run.clear_messages()  # an old stop request must not stop the new process
        argv = command(job, self.python)
        env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        try:
            with open(job.run.log_file, "a") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {display_command(job)}\n")
                log.flush()
                # a session of its own: the app's Ctrl+C does not reach it; force stop kills its whole group
                process = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:  # a missing folder, a full disk: the job fails, the queue goes on
            self._update(job.id, status=FAILED, ended=time.time(), error=f"could not start the trainer: {err}")
            return
        self._processes[job.id] = process
        job.run.write_process(process.pid, process_start_time(process.pid), self.device, job.threads)
        self._update(job.id, status=RUNNING, pid=process.pid, pid_started=process_start_time(process.pid),
                     started=time.time(), ended=None, requested=None, error=None,
                     step=job.run.last_step() or 0)

    # --- the supervisor ------------------------------------------------------------------------------------
    def start_supervisor(self, interval: float = 1.0) -> None:
        """poll() every ``interval`` seconds on a daemon thread (the app's; tests call poll() themselves)."""
        if self._supervisor is not None:
            return

        def loop():
            while not self._halt.wait(interval):
                try:
                    self.poll()
                except Exception as err:  # a full disk or a locked table must not kill the supervisor
                    print(f"pdmd jobs: poll failed: {err!r}", file=sys.stderr)

        self._supervisor = threading.Thread(target=loop, name="pdmd-jobs", daemon=True)
        self._supervisor.start()

    def stop_supervisor(self) -> None:
        self._halt.set()
        if self._supervisor is not None:
            self._supervisor.join()


# --- a job's files -----------------------------------------------------------------------------------------
def check_name(name) -> str:
    name = str(name or "").strip()
    if not NAME_PATTERN.fullmatch(name):
        raise JobError(f"run name {name!r} is not allowed: use 1-64 letters, digits, '-' or '_', starting with a "
                       "letter or digit (no slashes, dots or '..')")
    return name


def command(job: Job, python: str = sys.executable) -> list[str]:
    """Exactly what the job runs: the CLI's ``python -m pdmd train``."""
    argv = [python, "-m", "pdmd", "train", "--config", str(job.run.config_file),
            "--output-dir", str(job.folder), "--no-progress", "--threads", str(job.threads)]
    if job.from_student:  # kept on a resume too: the trainer takes the experts only when it starts at step 0
        argv += ["--from-student", job.from_student, "--start-phase", str(job.start_phase)]
    return argv + (["--resume", "latest"] if job.resume else [])


def display_command(job: Job) -> str:
    """The command as a person would type it in the repository root."""
    argv = command(job, "python")
    return shlex.join([_relative(a) for a in argv])


def _relative(arg: str) -> str:
    try:
        return str(Path(arg).relative_to(ROOT))
    except ValueError:
        return arg


def latest_checkpoint(job: Job) -> Path | None:
    return job.run.latest_checkpoint()


def eta_seconds(job: Job, rows: list[dict]) -> float | None:
    """Seconds left at the recent speed (mean it/s of the last 20 steps)."""
    recent = [r["it_per_s"] for r in rows[-20:] if r.get("it_per_s")]
    if job.status != RUNNING or not recent:
        return None
    return (job.total - job.step) / (sum(recent) / len(recent))


def zip_student(job: Job, folder: Path) -> Path:
    """``<folder>/<name>-student.zip`` of a finished job's student folder."""
    if not job.finished or not job.run.has_student():
        raise JobError(f"job {job.name!r} is {job.status}: only a finished job has a student to download")
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.make_archive(str(folder / f"{job.name}-student"), "zip", job.student))
