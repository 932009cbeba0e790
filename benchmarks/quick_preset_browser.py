"""The quick preset as a visitor runs it: started from the browser, watched to the end, its student evaluated.

    python benchmarks/quick_preset_browser.py [--preset "quick demo"] [--per-prompt 32]

Starts ``python app.py`` (a temporary runs folder), opens it in Debian chromium (Playwright), sets the tab's
"CPU threads" (``--threads``; the tab's default is one, keeping a core for the app), presses Start on the Train tab and waits until the progress line says
"finished". Reports the wall time from the click to that line, the tab's own last probe line (the adherence
it shows), and ``python -m pdmd eval --student <job>/student --per-prompt 32 --json`` next to the teacher's
eval at the same size (the issue's 384-image targets). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app_latency import start_app  # this folder's sibling script
from playwright.sync_api import expect, sync_playwright

from pdmd.paths import ROOT

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def evaluate(per_prompt: int, student: Path | None) -> dict:
    command = [sys.executable, "-m", "pdmd", "eval", "--per-prompt", str(per_prompt), "--threads", "2", "--json"]
    done = subprocess.run(command + (["--student", str(student)] if student else []), capture_output=True,
                          text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick demo")
    parser.add_argument("--per-prompt", type=int, default=32, help="eval images per prompt (12 prompts)")
    parser.add_argument("--threads", type=int, default=2, help="the job's CPU threads, as typed into the tab")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="pdmd-quick-"))
    server, url = start_app(str(runs))
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.get_by_role("tab", name="Train").click()
            page.locator("#train-preset input").fill(args.preset)
            page.locator("#train-preset input").press("Enter")
            page.locator("#train-name textarea").fill("quick-from-browser")
            page.locator("#train-threads input").fill(str(args.threads))
            page.locator("#train-start").click()
            clicked = time.perf_counter()
            progress = page.locator("#train-progress-text")
            expect(progress).to_contain_text("quick-from-browser — finished", timeout=args.timeout * 1000)
            seconds = time.perf_counter() - clicked
            probe_line = page.locator("#train-probe-text").inner_text() if page.locator("#train-probe-text").count() else ""
            page.screenshot(path=str(runs / "train-tab-finished.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    student = next(runs.glob("jobs/*/student"))
    print(json.dumps({"preset": args.preset, "threads": args.threads, "click_to_finished_s": round(seconds, 1), "tab_probe_line": probe_line,
                      "screenshot": str(runs / "train-tab-finished.png"),
                      "student": evaluate(args.per_prompt, student), "teacher": evaluate(args.per_prompt, None)},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
