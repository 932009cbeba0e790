"""A run folder: the files through which the trainer, the job manager and the Train tab talk.

    config.yaml          the job's validated config (written by the job manager)
    config.json          the config as the trainer read it
    train.log            the trainer's stdout and stderr
    metrics.jsonl        one JSON row per optimizer update (losses, DMD diagnostics, speed, memory)
    probe.jsonl          the student measured on a fixed probe set while it trains (``probe_every``): one row per
                         measurement, {"step", "seconds" (training time so far), "adherence", "fd", "diversity",
                         "position_spread", "size_spread", "images"}
    from_student.json    a job that trains on from a finished student: {"student", "start_phase"} (the job
                         manager's; the jobs table is rebuilt with it)
    control.json         a request to the running trainer: {"action": "stop" | "sample" | "save"}
    status.json          how the last trainer process ended: {"state", "step", "error"}
    samples/latest.png   the newest sample grid (and samples/step-NNNNNN.png)
    checkpoints/         atomic checkpoints, the last N kept (pdmd.training.checkpoints)
    student/             the exported student when the run finished (manifest.json + one LoRA per phase)
    process.json         the trainer process the job manager started: pid, kernel start time, device, threads
    rank-N.json          each process's final step and adapter fingerprint

Every write is atomic (a temporary file renamed into place), and every read tolerates a file that is missing,
cut short or not what it should be: a reader never raises on what a crashed or hostile writer left.
"""
from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from pdmd.training import checkpoints

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
PROBE_FILE = "probe.jsonl"
CONTROL_FILE = "control.json"
STATUS_FILE = "status.json"
PROCESS_FILE = "process.json"
FROM_STUDENT_FILE = "from_student.json"
CHECKPOINT_DIR = "checkpoints"
STUDENT_DIR = "student"
CONDITIONS_DIR = "conditions"  # condition images drawn for the run (pdmd.training.conditioning), with prompts.txt
LATEST_SAMPLE = "samples/latest.png"
ACTIONS = ("stop", "sample", "save")
TAIL_BYTES = 64 * 1024  # the end of a log or metrics file that readers look at


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_text(text)
    os.replace(temporary, path)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # --- where things are ------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def probe_file(self) -> Path:
        return self.path / PROBE_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def student(self) -> Path:
        return self.path / STUDENT_DIR

    @property
    def conditions(self) -> Path:
        return self.path / CONDITIONS_DIR

    @property
    def latest_sample(self) -> Path:
        return self.path / LATEST_SAMPLE

    def sample_file(self, step: int) -> Path:
        return self.path / "samples" / f"step-{step:06d}.png"

    def has_student(self) -> bool:
        return (self.student / "manifest.json").is_file()

    # --- control: the job manager asks, the trainer takes --------------------------------------------------
    def request(self, action: str) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
        _write_atomic(self.path / CONTROL_FILE, json.dumps({"action": action}))

    def take_request(self) -> str | None:
        """The pending action, removed so it is acted on once (None if there is none or it is unreadable)."""
        path = self.path / CONTROL_FILE
        if not path.is_file():
            return None
        try:
            action = json.loads(path.read_text()).get("action")
        except (OSError, ValueError, AttributeError):
            action = None
        path.unlink(missing_ok=True)
        return action if action in ACTIONS else None

    # --- status: how the trainer ended ---------------------------------------------------------------------
    def write_status(self, state: str, step: int, error: str | None = None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path / STATUS_FILE, json.dumps({"state": state, "step": step, "error": error}))

    def status(self) -> dict:
        try:
            said = json.loads((self.path / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return said if isinstance(said, dict) else {}

    def clear_messages(self) -> None:
        """Before a new trainer process starts: an old stop request or end status must not reach it."""
        for name in (CONTROL_FILE, STATUS_FILE):
            (self.path / name).unlink(missing_ok=True)

    # --- process: which trainer runs this folder (the jobs table can be rebuilt from it) --------------------
    def write_process(self, pid: int, started: int | None, device: str, threads: int) -> None:
        _write_atomic(self.path / PROCESS_FILE,
                      json.dumps({"pid": pid, "started": started, "device": device, "threads": threads}))

    def process(self) -> dict:
        try:
            said = json.loads((self.path / PROCESS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(said, dict) or not all(isinstance(said.get(k), int) for k in ("pid", "started")):
            return {}
        return said

    # --- from a student: the job's --from-student and --start-phase --------------------------------------------
    def write_from_student(self, student: str, start_phase: int) -> None:
        _write_atomic(self.path / FROM_STUDENT_FILE, json.dumps({"student": student, "start_phase": start_phase}))

    def from_student(self) -> dict:
        """{"student", "start_phase"}, or {} for a job that trains every phase (or an unreadable file)."""
        try:
            said = json.loads((self.path / FROM_STUDENT_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if (not isinstance(said, dict) or not isinstance(said.get("student"), str)
                or not isinstance(said.get("start_phase"), int) or isinstance(said.get("start_phase"), bool)):
            return {}
        return {"student": said["student"], "start_phase": said["start_phase"]}

    # --- metrics -------------------------------------------------------------------------------------------
    def append_metrics(self, handle, row: dict) -> None:
        handle.write(json.dumps(row) + "\n")
        handle.flush()

    def metrics(self) -> list[dict]:
        """The run's metrics rows, one per step; a step logged twice (re-run after a resume) keeps its last row.
        Lines that are cut short or lack a step are skipped, and every row has the loss keys (NaN if absent)."""
        rows: dict[int, dict] = {}
        try:
            lines = self.metrics_file.read_text(errors="replace").splitlines()
        except OSError:
            return []
        for line in lines:
            row = _metrics_row(line)
            if row is not None:
                rows[row["step"]] = row
        return [rows[k] for k in sorted(rows)]

    def last_step(self) -> int | None:
        """The newest logged step, read from the end of metrics.jsonl (it can grow long)."""
        for line in reversed(_tail_lines(self.metrics_file, 4096)):
            row = _metrics_row(line)
            if row is not None:
                return row["step"]
        return None

    def training_seconds(self) -> float | None:
        """Time the updates took: the sum of the logged steps' times (1 / it_per_s)."""
        speeds = [r["it_per_s"] for r in self.metrics() if r["it_per_s"] > 0]  # NaN compares False
        return sum(1 / s for s in speeds) if speeds else None

    def append_probe(self, row: dict) -> None:
        with open(self.probe_file, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            cut = handle.tell() > 0 and (handle.seek(-1, os.SEEK_END), handle.read(1))[1] != b"\n"
            handle.write((("\n" if cut else "") + json.dumps(row) + "\n").encode())  # a killed writer's half line stays apart

    def probes(self) -> list[dict]:
        """The probe measurements in step order (a step measured twice, after a resume, keeps its last row);
        rows that are cut short or lack a number are skipped."""
        rows: dict[int, dict] = {}
        try:
            lines = self.probe_file.read_text(errors="replace").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            step = row.get("step")
            values = [row.get(k) for k in PROBE_KEYS]
            if (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**53
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                rows[step] = {"step": step, **dict(zip(PROBE_KEYS, map(float, values)))}
        return [rows[k] for k in sorted(rows)]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(deque(_tail_lines(self.log_file, TAIL_BYTES), maxlen=lines)).rstrip()

    # --- checkpoints ---------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        return checkpoints.resolve_checkpoint(self.checkpoints, "latest")


def _tail_lines(path: Path, size: int) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read().decode(errors="replace").splitlines()
    except OSError:
        return []


PROBE_KEYS = ("seconds", "adherence", "fd", "diversity", "position_spread", "size_spread")
NUMBER_KEYS = ("loss_generator", "loss_fake", "grad_norm", "it_per_s", "memory_mb")


def _metrics_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
        step, phase = row["step"], row.get("phase", 1)
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill, or not a row
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53 for v in (step, phase)):
        return None
    clean = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in NUMBER_KEYS:
        clean.setdefault(key, float("nan"))
    return clean
