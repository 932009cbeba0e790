"""A real teacher in the live app, as a visitor uses it: a pipeline folder typed into Compare's teacher box loads,
and a Wan teacher's samples play as two mp4 videos side by side (Playwright + Debian chromium, like
test_app_browser.py)."""
from __future__ import annotations

import pytest
from test_app_browser import app_runs, app_url, assert_plays_mp4, page, playwright, screenshot  # noqa: F401  (fixtures, shared)


@pytest.fixture(scope="module")
def wan_folder(tiny_pipeline):
    return tiny_pipeline("wan2.2")


def test_a_typed_wan_folder_loads_and_compare_plays_two_mp4_videos(page, wan_folder):  # noqa: F811
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
