"""Resident memory of the app's model store under anonymous requests: N distinct uploaded students, then N
Load-teacher calls of the built-in teacher at N different resolutions, through the same handlers the Gradio
API calls (as a public server runs them: other teachers off).

    python benchmarks/memory_bounds.py --count 40 --threads 1

Prints one JSON object: RSS (MB) before, after the uploads, after the resolutions, and the peak, with the
store's cache sizes against their limits in pdmd/limits.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

import torch

from pdmd import limits
from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students.manifest import MANIFEST


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def upload_files(work: Path, index: int) -> list[str]:
    """A copy of the shipped phased student, made distinct by its seed, as a browser uploads it."""
    folder = work / f"student-{index}"
    shutil.copytree(SHIPPED_STUDENTS / "phased", folder, ignore=shutil.ignore_patterns("config.yaml"))
    data = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**data, "seed": index}))
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="pdmd-memory-"))
    os.environ["PDMD_RUNS_DIR"] = str(work / "runs")

    from ui import student_files, teacher_picker
    from ui.models import ModelStore

    store = ModelStore(other_teachers=False)
    store.teacher()
    result = {"count": args.count, "rss_mb_start": round(rss_mb(), 1)}
    for index in range(args.count):
        status = student_files.on_upload(store, upload_files(work, index))[1]
        assert "✓" in status, status
    result.update(rss_mb_after_uploads=round(rss_mb(), 1), students_loaded=len(store._students),
                  student_bytes_mb=round(store.student_bytes() / 2**20, 1),
                  student_budget_mb=limits.STUDENT_CACHE_BYTES / 2**20)
    for index in range(args.count):
        status = teacher_picker.on_load_teacher(store, "builtin", "", 32 + 8 * (index + 1), 32)[1]
        assert "✓" in status, status
    result.update(rss_mb_after_resolutions=round(rss_mb(), 1), teacher_copies=store.default_teacher_copies(),
                  teacher_copies_limit=limits.BUILTIN_TEACHER_COPIES,
                  rss_mb_peak=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
