"""Where things are: the repository, its shipped assets and configs, and the runs folder (the one place that
knows the layout on disk, so no other module counts ``parents[N]``)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
BUILTIN_TEACHER_DIR = ASSETS / "builtin-teacher"
PROBE_DIR = ASSETS / "probe"
DEFAULT_PROMPTS = ASSETS / "prompts" / "default.txt"
SHIPPED_STUDENTS = ASSETS / "students"
CONFIGS = ROOT / "configs"


def runs_dir() -> Path:
    """Training runs and uploads; PDMD_RUNS_DIR moves it (tests point it at a temporary folder)."""
    return Path(os.environ.get("PDMD_RUNS_DIR", ROOT / "runs")).resolve()


def jobs_dir() -> Path:
    return runs_dir() / "jobs"


def uploads_dir() -> Path:
    return runs_dir() / "uploads"
