"""The jobs table (``runs/jobs/jobs.sqlite``), opened defensively: it can always be rebuilt from the run folders.

Every connection checks the table first. A file that is not a database (damaged, truncated) is moved aside with a
message; a missing table (the file deleted while the app runs) is created again; either way the rows are then
rebuilt from the run folders on disk -- each one's config.yaml, status.json, metrics.jsonl and process.json --
so a trainer that is still running is adopted as running (and no second job starts beside it on its device).
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.processes import is_alive
from pdmd.training.run_folder import RunFolder

SCHEMA_VERSION = 2
DATABASE = "jobs.sqlite"
QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
FINISHED, STOPPED, INTERRUPTED, FAILED = "finished", "stopped", "interrupted", "failed"
ACTIVE = (RUNNING, STOPPING)                   # a process exists (or did, until poll() looks)
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
    error TEXT,
    from_student TEXT,                 -- with start_phase: the launch passes --from-student and --start-phase
    start_phase INTEGER
)"""
# schema 1 -> 2: the columns a version-1 table gets (NULL in its old rows: jobs that train every phase)
ADDED_IN_2 = (("from_student", "TEXT"), ("start_phase", "INTEGER"))
COLUMNS = ("name", "config", "status", "device", "threads", "resume", "pid", "pid_started", "created", "started",
           "ended", "step", "total", "error", "from_student", "start_phase")


class SchemaTooNew(RuntimeError):
    """The table was written by a newer pdmd: it is left alone rather than rebuilt."""


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
    from_student: str | None = None   # the student folder whose experts before start_phase the job keeps
    start_phase: int | None = None

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.folder)

    @property
    def student(self) -> Path:
        return self.run.student


class JobTable:
    def __init__(self, root: Path, device: str, say=None):
        self.root, self.device = Path(root), device
        self.path = self.root / DATABASE
        self.say = say or (lambda line: print(f"pdmd jobs: {line}", file=sys.stderr))
        self.notice = ""  # the last repair, for the Train tab to show
        self._repairing = threading.Lock()

    # --- connections ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self):
        """A short-lived connection (autocommit) to a table that exists: any thread may call, none holds the
        file open. A damaged or vanished table is repaired first (see the module's docstring)."""
        db = self._open()
        try:
            yield db
        finally:
            db.close()

    def _open(self) -> sqlite3.Connection:
        try:
            return self._checked()
        except sqlite3.DatabaseError as err:
            with self._repairing:
                try:  # another thread may have repaired it meanwhile
                    return self._checked()
                except sqlite3.DatabaseError:
                    self._repair(err)
            return self._checked()

    def _checked(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(f"{self.path} has schema {version}; this pdmd knows {SCHEMA_VERSION}")
            db.execute("SELECT 1 FROM jobs LIMIT 0")  # "no such table" when the file was deleted or is new
            if version < SCHEMA_VERSION:
                self._migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """An older table gets the newer columns, in one transaction (another app may be migrating it too)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in ADDED_IN_2:
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _repair(self, err: sqlite3.DatabaseError) -> None:
        missing_table = isinstance(err, sqlite3.OperationalError) and "no such table" in str(err)
        if not missing_table and self.path.exists():
            aside = self.path.with_name(f"{DATABASE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.replace(Path(f"{aside}{suffix}"))
            self.notice = f"{DATABASE} was damaged ({err}); it was moved aside as {aside.name}"
        else:
            self.notice = ""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers (every browser's timer) never wait for the writer
            db.execute(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            rebuilt = self._rebuild(db)
        finally:
            db.close()
        if self.notice or rebuilt:  # a first start (no file, no runs) has nothing to say
            self.notice = (f"{self.notice or f'{DATABASE} had no jobs table (deleted while the app ran?)'}; "
                           f"{rebuilt} job(s) rebuilt from their run folders")
            self.say(self.notice)

    # --- rebuilding from disk ------------------------------------------------------------------------------
    def _rebuild(self, db: sqlite3.Connection) -> int:
        """One row per run folder with a valid config.yaml, oldest first; a live trainer stays running."""
        folders = sorted((p for p in self.root.iterdir() if p.is_dir() and (p / "config.yaml").is_file()),
                         key=lambda p: p.stat().st_mtime)
        count = 0
        for folder in folders:
            row = self._row_from_disk(folder)
            if row is None:
                continue
            db.execute(f"INSERT OR IGNORE INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                       tuple(row[c] for c in COLUMNS))
            count += 1
        return count

    def _row_from_disk(self, folder: Path) -> dict | None:
        run = RunFolder(folder)
        try:
            config = TrainConfig.from_dict(yaml.safe_load(run.config_file.read_text()), output_dir=str(folder))
        except (OSError, yaml.YAMLError, ConfigError, TypeError, ValueError) as err:
            self.say(f"not rebuilt: {folder.name} ({err})")
            return None
        process = run.process()
        alive = is_alive(process.get("pid"), process.get("started"))
        state = run.status().get("state")
        status = RUNNING if alive else state if state in (FINISHED, STOPPED, FAILED) else INTERRUPTED
        step = run.last_step() or 0
        created = folder.stat().st_mtime
        origin = run.from_student()
        return {"name": folder.name, "config": json.dumps(config.as_dict()), "status": status,
                "device": process.get("device") or self.device, "threads": int(process.get("threads") or 1),
                "resume": 1 if step else 0, "pid": process.get("pid") if alive else None,
                "pid_started": process.get("started") if alive else None, "created": created,
                "started": created if alive else None, "ended": None if alive else time.time(), "step": step,
                "total": config.total_updates,
                "error": None if status in (RUNNING, FINISHED, STOPPED) else
                "rebuilt from its run folder after the jobs table was lost; resume it",
                "from_student": origin.get("student"), "start_phase": origin.get("start_phase")}
