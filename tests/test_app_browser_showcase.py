"""A public server with a showcase, as an anonymous visitor sees it (Playwright + Debian chromium) and as an API
client calls it (gradio_client): exactly the showcase's pairs, Wan as two playing mp4s, images with a slider."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_app_browser import ROOT, assert_plays_mp4, browser_page, free_port, playwright, screenshot, served_app
from test_showcase import showcase_file  # noqa: F401  (fixture, shared)


@pytest.fixture(scope="module")
def showcase_url(showcase_file, tmp_path_factory):  # noqa: F811
    # training off: a public server
    with served_app(tmp_path_factory.mktemp("runs"), PDMD_TRAINING="off", PDMD_SHOWCASE=str(showcase_file)) as url:
        yield url


@pytest.fixture(scope="module")
def page(showcase_url):
    with browser_page(showcase_url, "Showcase") as page:
        yield page


def pick(page, pair: str) -> None:
    page.locator("#showcase-pair input").click()
    page.get_by_role("option", name=pair).click()


def test_a_visitor_sees_exactly_the_showcase_pairs_and_no_other_teacher_picker(page):
    assert page.get_by_role("tab", name="Compare").count() == 0
    page.locator("#showcase-pair input").click()
    options = [text.replace("✓", "").strip() for text in page.get_by_role("option").all_inner_texts()]
    assert options == ["tiny-sd3/phased", "tiny-wan22/phased", "tiny-wan22/lightning-style", "tiny-zimage-style/phased"]
    page.keyboard.press("Escape")


def test_the_image_pair_shows_both_sides_and_a_before_after_slider(page):
    page.locator("#showcase-run").click()
    playwright.expect(page.locator("#showcase-status")).to_contain_text("Done.", timeout=90_000)
    playwright.expect(page.locator("#showcase-student-caption")).to_contain_text("NFE 4")
    playwright.expect(page.locator("#showcase-teacher-caption")).to_contain_text("NFE")
    playwright.expect(page.locator("#showcase-slider img").first).to_be_visible()
    screenshot(page, "showcase-sd3")


def test_the_wan_pair_plays_two_mp4_videos_with_per_phase_strengths(page):
    pick(page, "tiny-wan22/lightning-style")
    playwright.expect(page.locator("#showcase-strength-2")).to_be_visible()
    page.locator("#showcase-strength-1 input[type=number]").fill("0.5")
    page.locator("#showcase-run").click()
    playwright.expect(page.locator("#showcase-status")).to_contain_text("Done.", timeout=90_000)
    for side in ("teacher", "student"):
        assert_plays_mp4(page, f"#showcase-{side}-video")
    playwright.expect(page.locator("#showcase-slider")).to_be_hidden()
    screenshot(page, "showcase-wan")


def test_the_api_refuses_any_other_teacher_folder_or_hub_id(showcase_url, showcase_file):  # noqa: F811
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(showcase_url, verbose=False)
    endpoints = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert not any("teacher" in e and "showcase" not in e for e in endpoints)  # no teacher loading endpoint
    assert not any(name in e for e in endpoints for name in ("load", "upload", "import", "export"))
    tried = ["Qwen/Qwen-Image", "builtin", str(showcase_file.parent / "showcase-models" / "sd3"),
             "tiny-sd3/../../etc/passwd"]
    for value in tried:  # refused by gradio's own choices check, and by the handler's behind it
        try:
            status = client.predict(value, "a red cat", 0, 1.0, 1.0, api_name="/showcase_student")[3]
        except AppError as err:
            status = str(err)
        assert "not in the list of choices" in status or "is not offered here" in status
    with pytest.raises(AppError, match="2.5 is greater than maximum value 2"):  # the slider's own bound
        client.predict("tiny-wan22/lightning-style", "a red cat", 0, 2.5, 1.0, api_name="/showcase_student")
    assert "NFE 4" in client.predict("tiny-sd3/phased", "a red cat", 0, 1.0, 1.0, api_name="/showcase_student")[2]


def test_an_invalid_showcase_file_stops_the_app_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers:\n  - name: x\n    model: nowhere-folder\n    students: []\n")
    env = {**os.environ, "PDMD_RUNS_DIR": str(tmp_path), "PDMD_SHOWCASE": str(bad), "PDMD_TRAINING": "off"}
    done = subprocess.run([sys.executable, "app.py", "--port", str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "showcase refused" in line]
    assert lines == ["app.py: showcase refused: bad.yaml: teachers[x].model: nowhere-folder is not a diffusers "
                     "pipeline folder (no model_index.json)"]
