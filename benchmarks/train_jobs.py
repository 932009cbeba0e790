"""Train-tab figures: does the app stay responsive while a job trains, how fast does a stop stop, and what does
the quick preset cost and produce?

    OMP_NUM_THREADS=1 python benchmarks/train_jobs.py [--clicks 20] [--stops 3]

1. starts app.py on a free port (a temporary runs folder), times N Compare clicks (student image, full
   Compare with the teacher) with no job running;
2. starts the Train tab's "quick demo" job (the app's job manager adopts it) and times N clicks while it trains,
   then waits for it: wall time from submit to finished, and ``python -m pdmd eval --json`` of its student;
3. stop-to-exit: starts the "default" preset S times and stops it gracefully once it has trained a few steps,
   timing stop() -> the trainer process gone (and that its last step is checkpointed); one force stop too.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app_latency import compare_once, start_app, summary  # this folder's sibling script
from gradio_client import Client

from pdmd.paths import ROOT, SHIPPED_STUDENTS
from pdmd.training import checkpoints, jobs
from pdmd.training.jobs import JobManager
from ui.train_form import QUICK, preset_config

STUDENT = str(SHIPPED_STUDENTS / "phased")


def wait(manager: JobManager, job_id: int, condition, timeout: float = 900) -> jobs.Job:
    job = manager.wait(job_id, condition, timeout, interval=0.05)
    if not condition(job):
        raise RuntimeError(f"job {job.name} is {job.status} at step {job.step}: {job.error}")
    return job


def clicks(client: Client, n: int) -> dict:
    timings = [compare_once(client, STUDENT, i) for i in range(n)]
    return {"student_image": summary([s for s, _ in timings]), "full_compare": summary([t for _, t in timings])}


def stop_to_exit(manager: JobManager, name: str, force: bool, after_steps: int = 3) -> dict:
    job = manager.submit(name, preset_config("default"))
    job = wait(manager, job.id, lambda j: j.step >= after_steps)
    pid, started = job.pid, job.pid_started
    begin = time.perf_counter()
    manager.stop(job.id, force=force)
    while jobs.is_alive(pid, started):
        time.sleep(0.02)
    seconds = time.perf_counter() - begin
    job = wait(manager, job.id, lambda j: j.status == jobs.STOPPED)
    latest = checkpoints.resolve_checkpoint(job.folder / jobs.CHECKPOINT_DIR, "latest")
    checkpoint_step = int(latest.name.split("-")[1]) if latest else None
    return {"force": force, "seconds": round(seconds, 2), "stopped_at_step": job.step,
            "latest_checkpoint_step": checkpoint_step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--stops", type=int, default=3)
    parser.add_argument("--runs-dir", help="default: a new temporary folder")
    args = parser.parse_args()
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="pdmd-bench-runs-"))
    server, url = start_app(str(runs))
    result = {"runs_dir": str(runs), "cpu_cores": os.cpu_count()}
    try:
        client = Client(url, verbose=False)
        compare_once(client, STUDENT, 0)  # warm-up: loads the student
        result["compare_without_job"] = clicks(client, args.clicks)

        manager = JobManager(runs / "jobs")
        submitted = time.time()
        job = manager.submit("quick", preset_config(QUICK))
        wait(manager, job.id, lambda j: j.step >= 1)
        result["compare_with_job"] = clicks(client, args.clicks)
        job = wait(manager, job.id, lambda j: j.status == jobs.FINISHED)
        result["quick_preset"] = {"steps": job.total, "submit_to_finished_s": round(job.ended - submitted, 1),
                                  "process_start_to_finished_s": round(job.ended - job.started, 1),
                                  "student": str(job.student)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    evaluation = subprocess.run([sys.executable, "-m", "pdmd", "eval", "--student", str(job.student), "--threads",
                                 "1", "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
    result["quick_preset"]["eval"] = json.loads(evaluation.stdout)

    result["stop_to_exit"] = [stop_to_exit(manager, f"stop-{k}", force=False) for k in range(args.stops)]
    result["force_stop_to_exit"] = stop_to_exit(manager, "force-stop", force=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
