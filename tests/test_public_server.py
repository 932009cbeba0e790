"""What an anonymous visitor can send a public server, through the same handler functions the Gradio API calls:
each case of the hardening issue is refused with one clear line (or bounded), leaves nothing behind, and the app
keeps serving everyone else."""
import json
import shutil
from pathlib import Path

import pytest
from ui_fixtures import upload_files, with_changes

from pdmd import limits
from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students.manifest import MANIFEST
from ui import comparison, phases, student_files, students, teacher_picker
from ui.models import ModelStore

PHASED = SHIPPED_STUDENTS / "phased"


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("PDMD_RUNS_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def store():
    return ModelStore(other_teachers=False)  # as on a public server


def skipped(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def upload_of(tmp_path: Path, name: str, **changes) -> list[str]:
    """The shipped phased student as a browser uploads it, with manifest fields changed ("lora__rank": ...)."""
    folder = tmp_path / name
    shutil.copytree(PHASED, folder, ignore=shutil.ignore_patterns("config.yaml"))
    (folder / MANIFEST).write_text(json.dumps(with_changes(json.loads((folder / MANIFEST).read_text()), **changes)))
    return upload_files(tmp_path, folder)


def uploads(runs: Path) -> list[Path]:
    folder = runs / "uploads"
    return sorted(folder.iterdir()) if folder.is_dir() else []


MALFORMED = [
    ({"lora__rank": 300000}, "lora.rank = '300000' must be a whole number from 1 to 512"),  # grew the app to 22 GB
    ({"schedule": {"boundaries": [0.75], "steps": [2000, 3], "shift": 1.0}}, "a schedule has at most 1000"),
    ({"schedule": {"boundaries": [0.75], "steps": [61, 4], "shift": 1.0}}, "a few-step student has at most"),
    ({"teacher": 123}, "teacher = '123' must be a non-empty string"),
    ({"teacher": ["builtin"]}, "teacher = "),
    ({"lora__rank": "sixteen"}, "lora.rank = 'sixteen'"),
    ({"lora__rank": 0}, "lora.rank = '0'"),
    ({"lora": 5}, "lora = 5 must be an object"),
    ({"schedule": {"boundaries": [2.0], "steps": [1, 3], "shift": 1.0}}, "boundary 2.0 must lie strictly between"),
    ({"schedule": "x"}, "schedule 'x' must be a mapping"),
    ({"teacher_options": "x"}, "teacher_options must be an object"),
    ({"student_cfg": "high"}, "student_cfg = 'high' must be a finite number"),
    ({"student_cfg": float("nan")}, "student_cfg = nan must be a finite number"),
    ({"student_cfg": 1e308}, "student_cfg = 1e+308 must lie between 0 and 20"),
    ({"lora__target_modules": ["no_such_layer"]}, "match no layer"),  # only loading can tell: then removed
]


@pytest.mark.parametrize("changes, message", MALFORMED)
def test_a_malformed_upload_is_refused_and_leaves_nothing(store, runs, tmp_path, changes, message):
    update, status = student_files.on_upload(store, upload_of(tmp_path, "student", **changes))
    assert skipped(update) and "Upload refused" in status and message in status
    assert uploads(runs) == []
    assert str(runs) not in status and str(tmp_path) not in status  # no server path reaches the visitor


@pytest.mark.parametrize("changes, message", MALFORMED[:-1])
def test_a_malformed_folder_on_disk_is_left_out_and_the_list_still_works(store, runs, tmp_path, changes, message):
    good = runs / "uploads" / "good"
    shutil.copytree(PHASED, good)
    bad = runs / "uploads" / "bad"
    shutil.copytree(PHASED, bad)
    data = json.loads(upload_of(tmp_path, "x", **changes) and (tmp_path / "x" / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps(data))
    values = [value for _, value in students.picker_choices()]
    assert str(good) in values and str(bad) not in values
    assert str(bad) not in [value for _, value in students.picker_choices("builtin")]
    assert teacher_picker.on_load_teacher(store, "builtin", "")[1].startswith("✓")
    picked = comparison.student_of(store, str(good), "builtin")[0]
    assert picked == good.resolve()


def test_the_phases_tab_bounds_the_schedule_it_draws():
    last = {"boundaries": [0.5], "steps": [2, 2], "shift": 1.0}
    for fields, message in [(("0.5", "10000", "1"), "a schedule has at most 1000"),
                            (("0.5", "40", "1"), f"and {limits.MAX_PHASES_TAB_STEPS} steps"),
                            (("0.5", "2", "1e308"), "shift 1e+308 must lie between"),
                            (("0.5", "2", "1e-308"), "shift 1e-308 must lie between"),
                            (("0.5" * 1000, "2", "1"), "characters long; the limit is 200")]:
        plot, summary, status, state = phases.on_schedule_edit(*fields, last)
        assert skipped(plot) and state == last and message in status


def test_loaded_students_stay_within_their_memory_budget(runs, tmp_path):
    store = ModelStore(student_budget=3 * 20 * 2**20)  # room for about three copies of the built-in teacher
    for index in range(8):
        update, status = student_files.on_upload(store, upload_of(tmp_path, f"s{index}", seed=index))
        assert "✓" in status, status
        assert store.student_bytes() <= store.student_budget
    assert len(uploads(runs)) == 8 and len(store._students) == 4  # 4 copies of ~15.7 MB fit in 3 x 20 MiB


def test_built_in_teachers_at_other_resolutions_are_kept_least_recently_used(store):
    sizes = [(32 + 8 * k, 32) for k in range(limits.BUILTIN_TEACHER_COPIES + 4)]
    for height, width in sizes:
        status = teacher_picker.on_load_teacher(store, "builtin", "", height, width)[1]
        assert "✓" in status, status
        assert store.default_teacher_copies() <= limits.BUILTIN_TEACHER_COPIES
    assert store.teacher() is store.teacher()  # the plain default stays loaded


def test_old_uploads_are_pruned(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_UPLOADED_STUDENTS", 2)
    store = ModelStore()
    for index in range(4):
        assert "✓" in student_files.on_upload(store, upload_of(tmp_path, f"p{index}", seed=index))[1]
    assert len(uploads(runs)) == 2


def test_another_teacher_is_refused_without_naming_a_server_path(store, tmp_path):
    status = teacher_picker.on_load_teacher(store, "builtin", "~/models/secret-model")[1]
    assert "turned off on this public server" in status and "secret-model" not in status
    assert str(Path.home()) not in status
