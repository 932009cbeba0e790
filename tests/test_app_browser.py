"""The app as a visitor uses it: Playwright drives Debian chromium against a live ``python app.py`` (one
server for the module: its tests share the app's state, in file order).

Screenshots of every tab go to test-artifacts/ (gitignored) for a person to look at.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ui_fixtures import make_student

from pdmd.training.config import TrainConfig
from ui.train_form import PRESET_FILES, QUICK

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"app exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app did not answer on {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def app_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@contextlib.contextmanager
def served_app(runs: Path, **env):
    """``python app.py`` on a free port with its runs in ``runs`` (and ``env`` set), stopped on exit; the URL."""
    port = free_port()
    log = runs / "app.log"
    env = {**os.environ, "PDMD_RUNS_DIR": str(runs), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           **env}
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def assert_plays_mp4(page, selector: str) -> None:
    """The <video> inside ``selector`` has an .mp4 source whose duration the browser could read."""
    video = page.locator(f"{selector} video")
    video.wait_for(timeout=30_000)
    assert ".mp4" in video.get_attribute("src")
    page.wait_for_function("v => v.readyState >= 1 && v.duration > 0", arg=video.element_handle(), timeout=30_000)


@pytest.fixture(scope="module")
def app_url(app_runs):
    make_student(app_runs / "tiny" / "student")
    try:
        with served_app(app_runs) as url:
            yield url
    finally:
        kill_trainers(app_runs / "jobs" / "jobs.sqlite")


def kill_trainers(database: Path) -> None:
    """Trainers run in sessions of their own and outlive the app: a failed test must not leave one behind."""
    from pdmd.training.jobs import is_alive

    if database.is_file():
        with sqlite3.connect(database) as db:
            for pid, started in db.execute("SELECT pid, pid_started FROM jobs WHERE pid IS NOT NULL"):
                if is_alive(pid, started):
                    os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def browser_page(url: str, first_tab: str):
    """Debian chromium on ``url``, once ``first_tab`` is drawn."""
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.get_by_role("tab", name=first_tab).wait_for()
        yield page
        browser.close()


@pytest.fixture(scope="module")
def page(app_url):
    with browser_page(app_url, "Compare") as page:
        yield page


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_compare_shows_teacher_and_student_with_nfe_and_timings(page):
    open_tab(page, "Compare")
    page.locator("#compare-student input").click()
    page.get_by_role("option", name=re.compile("run: tiny")).click()
    page.locator("#compare-run").click()
    playwright.expect(page.locator("#teacher-caption")).to_contain_text("NFE 64", timeout=60_000)
    playwright.expect(page.locator("#student-caption")).to_contain_text(re.compile(r"NFE 4, \d+\.\d\d s"))
    playwright.expect(page.locator("#teacher-caption")).to_contain_text(re.compile(r"\d+\.\d\d s"))
    playwright.expect(page.locator("#compare-summary")).to_contain_text("faster")
    for image in ("#teacher-image img", "#student-image img", "#boundary-strip img"):
        playwright.expect(page.locator(image)).to_be_visible()
    # the before/after slider: teacher and student images, one over the other
    playwright.expect(page.locator("#compare-slider img")).to_have_count(2)
    playwright.expect(page.locator("#compare-slider img").first).to_be_visible()
    playwright.expect(page.locator("#teacher-video")).to_be_hidden()
    screenshot(page, "compare")


def test_compare_hands_a_checked_phase_to_the_teacher(page):
    open_tab(page, "Compare")
    page.locator("#compare-student input").click()
    page.get_by_role("option", name=re.compile("run: tiny")).click()
    # the boxes are rebuilt (unchecked) for the picked student: wait for tiny's t-ranges before checking one
    phase_2 = page.locator("#compare-teacher-phases").get_by_label("phase 2 (t 0.5 to 0)")
    playwright.expect(phase_2).to_be_visible(timeout=30_000)
    phase_2.check()
    page.locator("#compare-run").click()
    caption = page.locator("#student-caption")
    playwright.expect(caption).to_contain_text("phase 2 by the teacher (16 steps each, CFG 5)", timeout=60_000)
    playwright.expect(caption).to_contain_text("NFE 34")  # 2 student steps + 16 guided teacher steps
    playwright.expect(page.locator("#compare-status")).to_contain_text("Done.", timeout=60_000)
    screenshot(page, "compare-teacher-phase")
    phase_2.uncheck()  # the student alone again for the tests after this one


def test_one_click_example_runs_the_comparison(page):
    open_tab(page, "Compare")
    page.get_by_text("a blue circle on a light background").first.click()
    playwright.expect(page.locator("#student-caption")).to_contain_text("seed 7", timeout=60_000)
    playwright.expect(page.locator("#compare-status")).to_contain_text("Done.", timeout=60_000)


def test_phases_rejects_a_bad_boundary_with_a_visible_message(page):
    open_tab(page, "Phases")
    playwright.expect(page.locator("#phases-plot img")).to_be_visible(timeout=30_000)
    page.locator("#phases-boundaries textarea").fill("0.5, 1.5")
    message = page.locator("#phases-message")
    playwright.expect(message).to_contain_text("boundary 1.5 must lie strictly between 0 and 1", timeout=30_000)
    playwright.expect(message).to_be_visible()
    screenshot(page, "phases")
    page.locator("#phases-boundaries textarea").fill("0.875")  # and it recovers
    playwright.expect(message).to_contain_text("NFE 4", timeout=30_000)


def test_published_lora_has_one_strength_slider_per_phase(page):
    open_tab(page, "Phases")
    page.locator("#phases-steps textarea").fill("1, 1, 1")
    page.locator("#phases-boundaries textarea").fill("0.9, 0.5")
    playwright.expect(page.locator("#phases-message")).to_contain_text("NFE 3", timeout=30_000)
    open_tab(page, "Compare")
    page.get_by_text("Published LoRA").click()
    for k in range(1, 4):
        playwright.expect(page.locator(f"#published-strength-{k}")).to_be_visible(timeout=30_000)
    playwright.expect(page.locator("#published-strength-4")).to_be_hidden()
    slider = page.locator("#published-strength-2 input[type=range]")
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("0", "2")
    screenshot(page, "compare-published")
    open_tab(page, "Phases")  # back to two phases
    page.locator("#phases-boundaries textarea").fill("0.5")
    page.locator("#phases-steps textarea").fill("2, 2")
    playwright.expect(page.locator("#phases-message")).to_contain_text("NFE 4", timeout=30_000)
    open_tab(page, "Compare")
    playwright.expect(page.locator("#published-strength-3")).to_be_hidden(timeout=30_000)
    playwright.expect(page.locator("#published-strength-2")).to_be_visible()


def test_train_tab_starts_the_quick_preset_shows_progress_and_stops_it(page):
    open_tab(page, "Train")
    playwright.expect(page.locator("#train-gate")).to_contain_text("Training is on")
    page.locator("#train-name textarea").fill("browser-quick")
    page.locator("#train-start").click()
    progress = page.locator("#train-progress-text")
    playwright.expect(progress).to_contain_text("browser-quick — running", timeout=60_000)
    total = TrainConfig.from_yaml(PRESET_FILES[QUICK]).total_updates  # the preset is its file
    playwright.expect(progress).to_contain_text(re.compile(rf"step [1-9]\d*/{total}"), timeout=120_000)
    playwright.expect(page.locator("#train-command")).to_contain_text("python -m pdmd train --config")
    screenshot(page, "train")
    page.locator("#train-stop").click()
    playwright.expect(page.locator("#train-message")).to_contain_text("Stopping browser-quick")
    playwright.expect(progress).to_contain_text("browser-quick — stopped", timeout=60_000)
    playwright.expect(page.locator("#train-jobs")).to_contain_text("stopped")


def test_lab_opens_on_the_grid_and_tabulates_mean_and_std_over_seeds(page):
    open_tab(page, "Lab")
    playwright.expect(page.locator("#lab-caption")).to_contain_text("What to look for")
    playwright.expect(page.locator("#lab-mixture").get_by_label("grid")).to_be_checked()
    page.locator("#lab-iters input").fill("2")
    page.locator("#lab-base-iters input").fill("5")
    page.locator("#lab-seeds input").fill("9")
    page.locator("#lab-run").click()
    playwright.expect(page.locator("#lab-status")).to_contain_text("seeds 9 must lie between 1 and 5",
                                                                   timeout=30_000)
    page.locator("#lab-seeds input").fill("2")
    page.locator("#lab-run").click()
    playwright.expect(page.locator("#lab-plot img")).to_be_visible(timeout=90_000)
    playwright.expect(page.locator("#lab-status")).to_contain_text("mean ± std over seeds 0-1", timeout=90_000)
    playwright.expect(page.locator("#lab-table")).to_contain_text("±")
    playwright.expect(page.locator("#lab-table")).to_contain_text("dmd-sgts")
    screenshot(page, "lab")


def test_the_file_route_serves_nothing_of_the_runs_or_the_repository(app_url, app_runs):
    from urllib.error import HTTPError

    (app_runs / "jobs" / "x" ).mkdir(parents=True, exist_ok=True)
    (app_runs / "jobs" / "x" / "train.log").write_text("secret")
    refused = [app_runs / "jobs" / "jobs.sqlite", app_runs / "jobs" / "x" / "train.log",
               app_runs / "tiny" / "student" / "manifest.json", ROOT / "app.py", ROOT / "assets" / "students" /
               "phased" / "config.yaml", Path("/etc/passwd")]
    assert (app_runs / "jobs" / "jobs.sqlite").is_file()
    for path in refused:
        with pytest.raises(HTTPError) as answer:
            urllib.request.urlopen(f"{app_url}gradio_api/file={path}", timeout=10)
        assert answer.value.code == 403, path


# --- a real teacher: a pipeline folder typed into Compare's teacher box (last: it leaves that teacher loaded) --
@pytest.fixture(scope="module")
def wan_folder(tiny_pipeline):
    return tiny_pipeline("wan2.2")


def test_a_typed_wan_folder_loads_and_compare_plays_two_mp4_videos(page, wan_folder):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-teacher-path").get_by_role("textbox").fill(str(wan_folder))
    page.get_by_text("Teacher resolution").click()
    for label, value in (("Height (px)", "16"), ("Width (px)", "16"), ("Frames (video)", "5")):
        page.get_by_label(label).fill(value)
    page.locator("#compare-load-teacher").click()
    playwright.expect(page.locator("#compare-teacher-status")).to_contain_text("✓ Teacher", timeout=60_000)
    playwright.expect(page.locator("#compare-teacher-status")).to_contain_text("16×16, 5 frames")
    page.locator("#compare-run").click()
    playwright.expect(page.locator("#student-caption")).to_contain_text("Baseline", timeout=60_000)
    playwright.expect(page.locator("#compare-status")).to_contain_text("Done.", timeout=60_000)
    for side in ("teacher", "student"):
        assert_plays_mp4(page, f"#{side}-video")
        playwright.expect(page.locator(f"#{side}-image")).to_be_hidden()
    playwright.expect(page.locator("#compare-slider")).to_be_hidden()  # the slider is for images
    screenshot(page, "compare-wan")


def test_a_typed_i2v_folder_takes_an_uploaded_image_and_compare_plays_two_mp4_videos(page, tiny_pipeline, tmp_path):
    from PIL import Image

    first_frame = tmp_path / "first-frame.png"
    Image.new("RGB", (32, 16), (200, 40, 40)).save(first_frame)
    page.get_by_role("tab", name="Compare").click()
    playwright.expect(page.locator("#compare-image")).to_be_hidden()  # the Wan 2.2 text-to-video teacher's page
    page.locator("#compare-teacher-path").get_by_role("textbox").fill(str(tiny_pipeline("wan2.1-i2v")))
    if not page.get_by_label("Height (px)").is_visible():
        page.get_by_text("Teacher resolution").click()
    for label, value in (("Height (px)", "16"), ("Width (px)", "32"), ("Frames (video)", "5")):
        page.get_by_label(label).fill(value)
    page.locator("#compare-load-teacher").click()
    playwright.expect(page.locator("#compare-teacher-status")).to_contain_text("samples from an image", timeout=60_000)
    page.locator("#compare-run").click()  # no image yet: one line saying what to do
    playwright.expect(page.locator("#compare-status")).to_contain_text("upload an image", timeout=60_000)
    page.locator("#compare-image input[type=file]").set_input_files(str(first_frame))
    playwright.expect(page.locator("#compare-image")).to_contain_text("first-frame.png", timeout=30_000)
    page.locator("#compare-run").click()
    playwright.expect(page.locator("#compare-status")).to_contain_text("Done.", timeout=90_000)
    for side in ("teacher", "student"):
        assert_plays_mp4(page, f"#{side}-video")
    screenshot(page, "compare-i2v")
