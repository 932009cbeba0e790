"""Every callback of the app, called as a plain function: good input, bad input, and that bad input only
produces a message (never an exception that would take the page down)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from ui_fixtures import break_lora_keys, make_student, upload_files

from pdmd import limits
from pdmd.core.schedule import PRESETS
from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students.manifest import MANIFEST
from ui import compare, comparison, phases, student_files, students
from ui import lab as lab_tab
from ui.app import build_app
from ui.models import ModelStore

PAPER = PRESETS["paper-2x2"].as_dict()
PROMPT = "a red star on a dark background"


def no_progress(*args, **kwargs):
    pass


def skipped(value) -> bool:
    return value == {"__type__": "update"}  # gr.skip(): nothing changes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_student(root / "tiny" / "student")
    return root


@pytest.fixture(autouse=True)
def runs_dir(runs, monkeypatch):
    monkeypatch.setenv("PDMD_RUNS_DIR", str(runs))
    return runs


@pytest.fixture(scope="module")
def store():
    return ModelStore()


@pytest.fixture
def student(runs) -> str:
    return str(runs / "tiny" / "student")


def copy_student(runs: Path, name: str) -> Path:
    target = runs / name / "student"
    shutil.copytree(runs / "tiny" / "student", target)
    return target


def run_student(store, prompt=PROMPT, seed=0, value=None, source=comparison.AS_TRAINED, schedule=PAPER, cfg=3.0,
                randomise=False, teacher_phases=()):
    return compare.on_compare_student(store, prompt, seed, randomise, value or students.BASELINE, source, schedule, cfg,
                                      teacher_phases=teacher_phases)


# --- Compare -------------------------------------------------------------------------------------------------
def test_student_then_teacher_fill_images_captions_strip_and_download(store, student):
    video, image, caption, seed, _, run = run_student(store, value=student)
    assert not video["visible"] and image["visible"] and image["value"].size == (256, 256)
    assert "NFE 4" in caption and " s" in caption and seed == 0 and run["boundaries"] == [0.5]
    teacher_video, teacher_image, teacher_caption, summary, strip, download, slider, done = \
        compare.on_compare_teacher(store, run, 32, 3.0, progress=no_progress)
    assert not teacher_video["visible"] and isinstance(teacher_image["value"], Image.Image)
    assert "NFE 64" in teacher_caption
    # the before/after slider: teacher, then the student's image, same size
    assert slider["visible"] and slider["value"][1] is run["image"] and slider["value"][0].size == (256, 256)
    assert "faster" in summary and "×" in summary
    assert isinstance(strip, Image.Image) and strip.width > 4 * 128  # four tiles for the one boundary
    assert Path(download).is_file() and Image.open(download).size[0] > 2 * 256
    assert done == "Done."


def test_baseline_uses_the_phases_schedule_and_teacher_cfg(store):
    _, _, caption, _, _, run = run_student(store, schedule=PRESETS["wan2.2-lightning"].as_dict())
    assert "Baseline" in caption and "NFE 8" in caption and run["boundaries"] == [0.87]


def test_same_seed_gives_the_same_student_image(store, student):
    first, second = (run_student(store, value=student)[1]["value"] for _ in range(2))
    assert first.tobytes() == second.tobytes()


def test_randomise_reports_the_seed_it_used(store):
    _, _, caption, seed, _, run = run_student(store, seed=0, randomise=True)
    assert 0 <= seed <= limits.MAX_SEED and run["seed"] == seed and f"seed {seed}" in caption


@pytest.mark.parametrize("prompt, seed, needle", [
    ("", 0, "prompt is empty"),
    ("   ", 0, "prompt is empty"),
    ("a red blue star", 0, "two different colours"),
    (PROMPT, "abc", "seed 'abc' is not a number"),
    (PROMPT, -1, "must lie between"),
    (PROMPT, 1.5, "whole number"),
])
def test_bad_compare_input_gives_a_message_and_no_run(store, prompt, seed, needle):
    video, image, _, _, status, run = run_student(store, prompt=prompt, seed=seed)
    assert skipped(video) and skipped(image) and run is None and needle in status and "pdmd-error" in status
    assert all(skipped(v) for v in compare.on_compare_teacher(store, run, 32, 3.0, progress=no_progress))


def test_unknown_words_are_reported_not_fatal(store):
    *_, status, run = run_student(store, prompt="a red star with sparkles")
    assert run is not None and "sparkles" in status


@pytest.mark.parametrize("steps, cfg, needle", [("x", 3.0, "not a number"), (500, 3.0, "between"),
                                                 (32, 99, "CFG"), (1, 3.0, "at least 2")])
def test_bad_teacher_settings_give_a_message(store, steps, cfg, needle):
    run = run_student(store)[5]
    outputs = compare.on_compare_teacher(store, run, steps, cfg, progress=no_progress)
    assert all(skipped(v) for v in outputs[:7]) and needle in outputs[7]


def test_the_teacher_takes_the_checked_phases_of_the_student(store, student):
    _, image, caption, _, _, run = run_student(store, value=student, teacher_phases=["phase 2"])
    # 2 student steps, then the teacher's 32 / 2 steps at CFG 3, each 2 evaluations
    assert "phase 2 by the teacher (16 steps each, CFG 3)" in caption and "NFE 34" in caption
    assert run["boundaries"] == [0.5] and image["visible"]
    *_, strip, download, _, done = compare.on_compare_teacher(store, run, 32, 3.0, progress=no_progress)
    assert isinstance(strip, Image.Image) and Path(download).is_file() and done == "Done."
    caption = run_student(store, value=student, teacher_phases=["phase 2", "phase 1"])[2]
    assert "phases 1 and 2 by the teacher" in caption and "NFE 64" in caption


@pytest.mark.parametrize("teacher_phases, needle", [
    (["phase 3"], "'phase 3' is not a phase of this student (phase 1 to phase 2)"),
    (["phase 0"], "'phase 0' is not a phase"),
    (["teacher"], "'teacher' is not a phase"),
    ([["phase 1"]], "a teacher phase must be text"),
    ({"phase": 1}, "must be a list of labels"),
    (["phase 1"] * 3, "3 teacher phases for a student of 2 phase(s)"),
])
def test_bad_teacher_phases_are_refused_and_load_nothing(student, teacher_phases, needle):
    store = ModelStore()  # its own, so that nothing a rejected request loaded could hide among earlier loads
    video, image, _, _, status, run = run_student(store, value=student, teacher_phases=teacher_phases)
    assert skipped(video) and skipped(image) and run is None and needle in status and "pdmd-error" in status
    assert store.student_bytes() == 0


def test_the_baseline_takes_no_teacher_phases(store):
    status, run = run_student(store, teacher_phases=["phase 1"])[4:]
    assert run is None and "baseline is the teacher already" in status


def test_teacher_phase_boxes_follow_the_picked_student(store, student):
    update = compare.on_pick_student(store, student)
    # values are what parse_teacher_phases reads; labels name the phase's t-range (make_student: boundary 0.5)
    assert update["choices"] == [("phase 1 (t 1 to 0.5)", "phase 1"), ("phase 2 (t 0.5 to 0)", "phase 2")]
    assert update["value"] == [] and update["visible"]
    assert not compare.on_pick_student(store, students.BASELINE)["visible"]
    assert not compare.on_pick_student(store, str(SHIPPED_STUDENTS / "dmd"))["visible"]  # one phase


def test_student_folder_without_manifest(store, runs):
    folder = copy_student(runs, "no-manifest")
    (folder / MANIFEST).unlink()
    status = run_student(store, value=str(folder))[4]
    assert "manifest.json is missing" in status


def test_student_folder_with_a_pickle(store, runs):
    folder = copy_student(runs, "pickled")
    (folder / "phase_1" / "extra.bin").write_bytes(b"not loaded")
    status = run_student(store, value=str(folder))[4]
    assert "pickle" in status and "extra.bin" in status


def test_student_whose_loras_do_not_fit_the_teacher(store, runs):
    folder = copy_student(runs, "misfit")
    break_lora_keys(folder)
    status = run_student(store, value=str(folder))[4]
    assert "match no module" in status


def test_folder_outside_the_app_roots_is_refused(store, tmp_path):
    make_student(tmp_path / "elsewhere")
    status = run_student(store, value=str(tmp_path / "elsewhere"))[4]
    assert "not one of the app's student folders" in status


def test_phases_schedule_must_match_the_students_experts(store, student):
    three = PRESETS["one-step-per-phase"].as_dict()
    status = run_student(store, value=student, source=comparison.FROM_PHASES, schedule=three)[4]
    assert "4 phase(s)" in status and "2 expert(s)" in status
    shifted = PRESETS["wan2.2-lightning"].as_dict()
    run = run_student(store, value=student, source=comparison.FROM_PHASES, schedule=shifted)[5]
    assert run["boundaries"] == [0.87]


def test_describe_student_shows_the_schedule(store, student):
    assert "boundaries 0.5" in compare.describe_student(store, student, comparison.AS_TRAINED, PAPER)
    assert "Baseline" in compare.describe_student(store, students.BASELINE, comparison.AS_TRAINED, PAPER)
    assert "pdmd-error" in compare.describe_student(store, "/etc", comparison.AS_TRAINED, PAPER)


def test_teacher_schedule_lands_on_every_boundary():
    assert comparison.teacher_schedule(32, 1.0, (0.5,)).steps == (16, 16)
    assert comparison.teacher_schedule(32, 1.0, (0.875,)).timesteps == PRESETS["wan2.2-lightning"].__class__.uniform(
        32).timesteps  # the plain 32-step grid already has 0.875 on it
    uneven = comparison.teacher_schedule(5, 1.0, (0.99, 0.98, 0.97))
    assert sum(uneven.steps) == 5 and min(uneven.steps) >= 1


def test_diversity_scores_both_sides(store, student):
    teacher_grid, student_grid, text = compare.on_diversity(store, PROMPT, 0, 4, student, comparison.AS_TRAINED, PAPER,
                                                            8, 3.0, progress=no_progress)
    assert isinstance(teacher_grid, Image.Image) and isinstance(student_grid, Image.Image)
    assert "Diversity" in text and "teacher **" in text


def test_diversity_rejects_bad_input(store):
    outputs = compare.on_diversity(store, "", 0, 4, students.BASELINE, comparison.AS_TRAINED, PAPER, 8, 3.0,
                                   progress=no_progress)
    assert skipped(outputs[0]) and "prompt is empty" in outputs[2]
    outputs = compare.on_diversity(store, PROMPT, 0, 99, students.BASELINE, comparison.AS_TRAINED, PAPER, 8, 3.0,
                                   progress=no_progress)
    assert "number of seeds" in outputs[2]


def test_refresh_lists_baseline_and_runs(student):
    update = compare.on_refresh_students("/gone")
    values = [value for _, value in update["choices"]]
    assert values[0] == students.BASELINE and student in values
    assert update["value"] == str(SHIPPED_STUDENTS / "phased")  # a vanished pick falls back to the default
    assert students.default_choice() in values


# --- uploads -------------------------------------------------------------------------------------------------
def test_upload_imports_a_student_and_selects_it(store, student, tmp_path, runs):
    update, message = student_files.on_upload(store, upload_files(tmp_path, Path(student)))
    assert "✓" in message and update["value"].startswith(str(runs / "uploads"))
    assert run_student(store, value=update["value"])[5]["nfe"] == 4


def test_upload_refuses_pickles_other_files_and_missing_manifest(store, student, tmp_path):
    files = upload_files(tmp_path, Path(student))
    pickle = tmp_path / "weights.pt"
    pickle.write_bytes(b"x")
    assert "pickle" in student_files.on_upload(store, files + [str(pickle)])[1]
    script = tmp_path / "run.py"
    script.write_text("print()")
    assert "only .safetensors" in student_files.on_upload(store, files + [str(script)])[1]
    assert "exactly one manifest.json" in student_files.on_upload(store, [f for f in files if MANIFEST not in f])[1]
    assert "no files uploaded" in student_files.on_upload(store, None)[1]


def test_upload_size_limit(store, student, tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_UPLOAD_BYTES", 100)
    assert "the limit is" in student_files.on_upload(store, upload_files(tmp_path, Path(student)))[1]


def test_upload_with_loras_that_do_not_fit_is_refused_and_removed(store, runs, tmp_path):
    folder = copy_student(runs, "misfit-upload")
    break_lora_keys(folder)
    before = set((runs / "uploads").glob("*")) if (runs / "uploads").is_dir() else set()
    update, message = student_files.on_upload(store, upload_files(tmp_path, folder))
    assert skipped(update) and "match no module" in message
    assert set((runs / "uploads").glob("*")) == before  # nothing left for the picker to offer


def test_sanitise_names():
    assert students.sanitise("../../etc/passwd") == "etc-passwd"
    assert students.sanitise("...") == "student"


# --- Phases --------------------------------------------------------------------------------------------------
def test_valid_schedule_plots_and_feeds_compare():
    plot, summary, message, state = phases.on_schedule_edit("0.9, 0.6", "2", "3", PAPER)
    assert isinstance(plot, Image.Image)
    assert "NFE 6" in summary and "log-SNR" in summary and "-4.394" in summary
    assert "✓" in message and state == {"boundaries": [0.9, 0.6], "steps": [2, 2, 2], "shift": 3.0}


@pytest.mark.parametrize("boundaries, steps, shift, needle", [
    ("1.5", "2", "1", "boundary 1.5 must lie strictly between 0 and 1"),
    ("0.3, 0.6", "2", "1", "strictly decreasing"),
    ("0.5, abc", "2", "1", "'abc' is not a number"),
    ("0.5", "2, 2, 2", "1", "3 phases"),
    ("0.5", "0", "1", "at least 1"),
    ("0.5", "2", "-1", "shift -1 must lie between 0.01 and 100"),
    ("0.5", "2", "", "not a number"),
])
def test_invalid_schedule_names_the_problem_and_keeps_the_last_valid(boundaries, steps, shift, needle):
    plot, summary, message, state = phases.on_schedule_edit(boundaries, steps, shift, PAPER)
    assert skipped(plot) and skipped(summary) and state == PAPER
    assert needle in message and "pdmd-error" in message


def test_presets_fill_the_editor():
    assert phases.on_preset("wan2.2-lightning") == ("0.87", "2, 2", "5", "")
    assert "unknown preset" in phases.on_preset("nope")[3]


# --- Lab -----------------------------------------------------------------------------------------------------
def test_lab_runs_methods_and_tabulates_metrics():
    plot, table, message = lab_tab.on_run_lab(["teacher", "dmd"], "ring", 4, "exact", 2, 5, 200, 0,
                                              progress=no_progress)
    assert isinstance(plot, Image.Image) and plot.width > 600
    assert [row[0] for row in table] == ["teacher", "dmd"] and len(table[0]) == len(lab_tab.TABLE_COLUMNS)
    assert "✓" in message


@pytest.mark.parametrize("methods, iters, needle", [([], 2, "at least one method"), (["dmd"], "many", "not a number"),
                                                    (["dmd"], 0, "between"), (["nope"], 2, "unknown choice")])
def test_lab_bad_input(methods, iters, needle):
    plot, table, message = lab_tab.on_run_lab(methods, "ring", 4, "exact", iters, 5, 200, 0, progress=no_progress)
    assert skipped(plot) and needle in message


# --- the app -------------------------------------------------------------------------------------------------
def test_app_has_the_four_tabs_in_order(store):
    app = build_app(store)
    tabs = [block.label for block in app.blocks.values() if type(block).__name__ == "Tab"]
    assert tabs == ["Compare", "Phases", "Train", "Lab"]


def test_host_and_port_from_flags_and_env(monkeypatch):
    import app

    monkeypatch.setenv("PDMD_PORT", "8123")
    assert app.parse_args([]).port == 8123 and app.parse_args([]).host == "127.0.0.1"
    assert app.parse_args(["--host", "0.0.0.0", "--port", "9000"]).port == 9000
