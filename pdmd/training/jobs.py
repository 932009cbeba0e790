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

import contextlib
import hmac
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
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import yaml

from pdmd.paths import ROOT, jobs_dir
from pdmd.training import checkpoints
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import CHECKPOINT_DIR, CONTROL_FILE, METRICS_FILE, STATUS_FILE, STUDENT_DIR

SCHEMA_VERSION = 1
DATABASE = "jobs.sqlite"
CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
ERROR_LOG_LINES = 15
LAUNCH_GRACE_S = 30  # a running job without a pid yet is being started by some app, not dead
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
FINISHED, STOPPED, INTERRUPTED, FAILED = "finished", "stopped", "interrupted", "failed"
ACTIVE = (RUNNING, STOPPING)                   # a process exists (or did, until poll() looks)
RESUMABLE = (STOPPED, INTERRUPTED, FAILED)
ACTIONS = ("sample", "save")                   # the trainer's control.json actions besides stop


class JobError(ValueError):
    """A request the job manager refuses; the message says why and what to do instead."""


# --- the gate for public servers ---------------------------------------------------------------------------
TRAINING_ENV, TOKEN_ENV = "PDMD_TRAINING", "PDMD_TRAIN_TOKEN"


@dataclass(frozen=True)
class Gate:
    """Who may start or stop jobs: everyone (``on``), nobody (``off``) or holders of a token (``token``).

    ``PDMD_TRAINING`` picks the mode; unset, it is ``on`` except on a Hugging Face Space (``SPACE_ID`` set),
    where a public page must not hand every visitor a CPU: there it is ``off``.
    """
    mode: str
    token: str = ""
    note: str = ""

    @classmethod
    def from_env(cls, env=None) -> "Gate":
        env = os.environ if env is None else env
        default = "off" if env.get("SPACE_ID") else "on"
        mode = env.get(TRAINING_ENV, default).strip().lower() or default
        token = env.get(TOKEN_ENV, "")
        if mode not in ("on", "off", "token"):  # fail closed: a typo must not open a public server
            return cls("off", note=f"{TRAINING_ENV}={mode!r} is not on, off or token, so training is off")
        if mode == "token" and not token:
            return cls("off", note=f"{TRAINING_ENV}=token but {TOKEN_ENV} is empty, so training is off")
        return cls(mode, token)

    def describe(self) -> str:
        if self.mode == "on":
            return "Training is **on**: anyone who can open this page can start and stop jobs."
        if self.mode == "token":
            return f"Training **needs the token** ({TOKEN_ENV}): enter it to start, stop or resume jobs."
        return f"Training is **off** on this server ({self.note or TRAINING_ENV + '=off'}); past jobs stay visible."

    def check(self, token) -> None:
        if self.mode == "on":
            return
        if self.mode == "off":
            raise JobError(f"training is turned off on this server ({self.note or TRAINING_ENV + '=off'})")
        if not hmac.compare_digest(str(token or "").encode(), self.token.encode()):
            raise JobError("wrong or missing training token: ask the server's owner for it")


# --- processes ---------------------------------------------------------------------------------------------
def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a live process (clock ticks since boot); None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def is_alive(pid: int | None, started: int | None) -> bool:
    return bool(pid) and started is not None and process_start_time(pid) == started


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def default_threads() -> int:
    """Torch threads of a job: 1 unless PDMD_TRAIN_THREADS says otherwise -- on a 2-core host one core
    trains and the other keeps the app answering."""
    try:
        return max(1, int(os.environ.get("PDMD_TRAIN_THREADS", "1")))
    except ValueError:
        return 1


# --- the table ---------------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,              -- the validated TrainConfig as JSON
    status TEXT NOT NULL,
    device TEXT NOT NULL,
    threads INTEGER NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0, -- the next launch passes --resume latest
    requested TEXT,                    -- 'stop' or 'kill' once a person asked: tells stopped from crashed
    pid INTEGER,
    pid_started INTEGER,               -- /proc start time of pid: a reused pid is not our trainer
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL,
    error TEXT
)"""


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    config: dict
    status: str
    device: str
    threads: int
    resume: bool
    requested: str | None
    pid: int | None
    pid_started: int | None
    created: float
    started: float | None
    ended: float | None
    step: int
    total: int
    error: str | None
    folder: Path

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def student(self) -> Path:
        return self.folder / STUDENT_DIR


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
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers (every browser's timer) never wait for the writer
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JobError(f"{self.root / DATABASE} has schema {version}; this pdmd knows {SCHEMA_VERSION}")
            db.execute(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.poll()  # recovery: jobs whose process died with the previous app, and the queue

    # --- storage -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self):
        """A short-lived connection (autocommit): any thread may call, none holds the file open."""
        db = sqlite3.connect(self.root / DATABASE, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

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
    def submit(self, name: str, config: dict, threads: int | None = None) -> Job:
        """Validate, write runs/jobs/<name>/config.yaml and queue the job (it starts now if the device is free).
        Raises JobError / ConfigError naming the problem; nothing is written then."""
        name = check_name(name)
        folder = self.root / name
        validated = TrainConfig.from_dict(dict(config), output_dir=str(folder))  # ConfigError names the field
        threads = default_threads() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise JobError(f"threads = {threads!r} must be a whole number of at least 1")
        with self._lock, self._connect() as db:
            if db.execute("SELECT 1 FROM jobs WHERE name = ?", (name,)).fetchone() or folder.exists():
                raise JobError(f"a job named {name!r} already exists: resume it, or pick another name")
            folder.mkdir(parents=True)
            (folder / CONFIG_FILE).write_text(yaml.safe_dump(validated.as_dict(), sort_keys=False))
            cursor = db.execute(
                "INSERT INTO jobs (name, config, status, device, threads, created, total) VALUES (?,?,?,?,?,?,?)",
                (name, json.dumps(validated.as_dict()), QUEUED, self.device, threads, time.time(),
                 validated.total_steps))
            job_id = cursor.lastrowid
        self.poll()
        return self.get(job_id)

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
                write_control(job.folder, "stop")
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
        write_control(job.folder, action)
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
        step = last_step(job.folder) or job.step
        if alive:
            if step != job.step:
                self._update(job.id, step=step)
            return
        self._processes.pop(job.id, None)
        status, error = self._ending(job, code)
        self._update(job.id, status=status, error=error, step=step, ended=time.time(), pid=None, pid_started=None)

    def _ending(self, job: Job, code: int | None) -> tuple[str, str | None]:
        """The status a job ends in: the trainer's own word (status.json) first, then the exit code."""
        try:
            said = json.loads((job.folder / STATUS_FILE).read_text())
        except (OSError, ValueError):
            said = {}
        state = said.get("state") if isinstance(said, dict) else None
        if state == FINISHED:
            return FINISHED, None
        if state == STOPPED:
            return STOPPED, None
        if job.requested == "kill":
            return STOPPED, f"force-stopped at step {last_step(job.folder)}; resume continues from the latest checkpoint"
        tail = log_tail(job, ERROR_LOG_LINES)
        if state == FAILED or (code is not None and code > 0):
            return FAILED, tail or f"the trainer exited with code {code}"
        if job.requested == "stop":  # SIGTERM arrived before the trainer could catch it (still loading)
            return STOPPED, None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else "ended without a word"
        if code is None and "Traceback (most recent call last)" in tail:
            return FAILED, tail
        return INTERRUPTED, f"the trainer process {how} (app restart, out of memory or a kill?); resume it"

    def _launch(self, job: Job) -> None:
        for stale in (CONTROL_FILE, STATUS_FILE):  # an old stop request must not stop the new process
            (job.folder / stale).unlink(missing_ok=True)
        argv = command(job, self.python)
        env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        try:
            with open(job.folder / LOG_FILE, "a") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {display_command(job)}\n")
                log.flush()
                # a session of its own: the app's Ctrl+C does not reach it; force stop kills its whole group
                process = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:  # a missing folder, a full disk: the job fails, the queue goes on
            self._update(job.id, status=FAILED, ended=time.time(), error=f"could not start the trainer: {err}")
            return
        self._processes[job.id] = process
        self._update(job.id, status=RUNNING, pid=process.pid, pid_started=process_start_time(process.pid),
                     started=time.time(), ended=None, requested=None, error=None,
                     step=last_step(job.folder) or 0)

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
    argv = [python, "-m", "pdmd", "train", "--config", str(job.folder / CONFIG_FILE),
            "--output-dir", str(job.folder), "--no-progress", "--threads", str(job.threads)]
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


def write_control(folder: Path, action: str) -> None:
    temporary = folder / f".tmp-{CONTROL_FILE}"  # renamed into place: the trainer never reads half a file
    temporary.write_text(json.dumps({"action": action}))
    os.replace(temporary, folder / CONTROL_FILE)


def latest_checkpoint(job: Job) -> Path | None:
    return checkpoints.resolve_checkpoint(job.folder / CHECKPOINT_DIR, "latest")


def metrics(folder: Path) -> list[dict]:
    """The run's metrics rows, one per step; a step logged twice (re-run after a resume) keeps its last row."""
    rows: dict[int, dict] = {}
    try:
        lines = (folder / METRICS_FILE).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
            rows[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return [rows[k] for k in sorted(rows)]


def last_step(folder: Path) -> int | None:
    """The newest logged step, read from the end of metrics.jsonl (it can grow long)."""
    path = folder / METRICS_FILE
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def log_tail(job: Job, lines: int = 40) -> str:
    try:
        with (job.folder / LOG_FILE).open(errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return ""


def eta_seconds(job: Job, rows: list[dict]) -> float | None:
    """Seconds left at the recent speed (mean it/s of the last 20 steps)."""
    recent = [r["it_per_s"] for r in rows[-20:] if r.get("it_per_s")]
    if job.status != RUNNING or not recent:
        return None
    return (job.total - job.step) / (sum(recent) / len(recent))


def zip_student(job: Job, folder: Path) -> Path:
    """``<folder>/<name>-student.zip`` of a finished job's student folder."""
    if not job.finished or not (job.student / "manifest.json").is_file():
        raise JobError(f"job {job.name!r} is {job.status}: only a finished job has a student to download")
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.make_archive(str(folder / f"{job.name}-student"), "zip", job.student))
