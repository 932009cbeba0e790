"""The typed student manifest: every field checked (a hostile file is one clear error naming the field), old
version-1 manifests still read, and a written manifest reads back equal."""
import json
import math
import shutil
from pathlib import Path

import pytest
from ui_fixtures import with_changes

from pdmd import limits
from pdmd.paths import SHIPPED_STUDENTS
from pdmd.students import StudentError
from pdmd.students.manifest import VERSION, Manifest

PHASED = SHIPPED_STUDENTS / "phased"
# the shipped phased student's manifest as version 1 wrote it (before the key renames)
VERSION_1 = {"version": 1, "teacher": "builtin", "method": "phased", "cfg": 1.0, "teacher_cfg": 5.0,
             "steps_trained": 1800, "steps_per_phase": [800, 1000], "ema_decay": 0.0, "seed": 0,
             "schedule": {"boundaries": [0.75], "steps": [1, 3], "shift": 1.0},
             "phases": ["phase_1/pytorch_lora_weights.safetensors", "phase_2/pytorch_lora_weights.safetensors"],
             "lora": {"rank": 16, "alpha": 16.0, "target_modules": ["to_q", "to_k"], "prefix": "unet"}}


def test_shipped_students_are_version_2_and_read_back_equal(tmp_path):
    for folder in sorted(p for p in SHIPPED_STUDENTS.iterdir() if p.is_dir()):
        manifest = Manifest.read(folder)
        assert json.loads((folder / "manifest.json").read_text())["version"] == VERSION
        manifest.write(tmp_path)
        assert Manifest.read(tmp_path) == manifest


def test_version_1_keys_still_read_with_one_deprecation_line():
    with pytest.warns(FutureWarning, match="manifest version 1 keys") as caught:
        manifest = Manifest.from_dict(VERSION_1)
    assert len(caught) == 1
    assert (manifest.student_cfg, manifest.updates_trained, manifest.updates_per_phase) == (1.0, 1800, (800, 1000))
    assert manifest.as_dict()["version"] == VERSION and "cfg" not in manifest.as_dict()
    two_networks = {**VERSION_1, "experts": ["transformer", "transformer_2"]}
    with pytest.warns(FutureWarning):
        assert Manifest.from_dict(two_networks).networks == ("transformer", "transformer_2")


def _with(**changes) -> dict:
    return with_changes(json.loads((PHASED / "manifest.json").read_text()), **changes)


@pytest.mark.parametrize("changes, message", [
    ({"teacher": 123}, "teacher = '123' must be a non-empty string"),
    ({"teacher": ["builtin"]}, "teacher = "),
    ({"lora__rank": "sixteen"}, "lora.rank = 'sixteen' must be a whole number from 1 to"),
    ({"lora__rank": 0}, "lora.rank = '0' must be a whole number"),
    ({"lora__rank": 300000}, f"lora.rank = '300000' must be a whole number from 1 to {limits.MAX_LORA_RANK}"),
    ({"lora": 5}, "lora = 5 must be an object"),
    ({"lora__target_modules": []}, "lora.target_modules must be a non-empty list"),
    ({"schedule": {"boundaries": [2.0], "steps": [1, 3], "shift": 1.0}}, "boundary 2.0 must lie strictly between"),
    ({"schedule": "x"}, "schedule: schedule 'x' must be a mapping"),
    ({"schedule": {"boundaries": [0.75], "steps": [2000, 3], "shift": 1.0}}, "a schedule has at most 1000"),
    ({"schedule": {"boundaries": [0.75], "steps": [60, 5], "shift": 1.0}}, "a few-step student has at most"),
    ({"schedule": {"boundaries": [0.75], "steps": [1, 3], "shift": 1e308}}, "shift"),
    ({"teacher_options": "x"}, "teacher_options must be an object"),
    ({"teacher_options": {"height": 100000}}, "teacher_options.height = 100000 must be a whole number from 1 to"),
    ({"student_cfg": "high"}, "student_cfg = 'high' must be a finite number"),
    ({"student_cfg": math.nan}, "student_cfg = nan must be a finite number"),
    ({"student_cfg": 1e308}, f"student_cfg = 1e+308 must lie between 0 and {limits.MAX_CFG:g}"),
    ({"phases": ["../../etc/passwd.safetensors", "phase_2/x.safetensors"]}, "must be a .safetensors path inside"),
    ({"phases": ["phase_1/x.safetensors"]}, "one LoRA file per phase of the schedule (2)"),
    ({"version": 7}, "version 7 is unknown"),
    ({"surprise": 1}, "unknown key(s) ['surprise']"),
    ({"ema_decay": 1.0}, "ema_decay = 1 would never move"),
    ({"seed": -1}, "seed = -1 must be a whole number from 0"),
])
def test_a_malformed_manifest_is_one_error_naming_the_field(changes, message):
    with pytest.raises(StudentError) as caught:
        Manifest.from_dict(_with(**changes))
    assert message in str(caught.value)


def test_read_names_the_file_and_refuses_pickles_and_huge_files(tmp_path):
    folder = tmp_path / "student"
    shutil.copytree(PHASED, folder)
    (folder / "manifest.json").write_text(json.dumps(_with(lora__rank=0)))
    with pytest.raises(StudentError, match=f"{folder / 'manifest.json'}: lora.rank"):
        Manifest.read(folder)
    (folder / "manifest.json").write_text(" " * (limits.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(StudentError, match="larger than"):
        Manifest.read(folder)
    shutil.copy(PHASED / "manifest.json", folder / "manifest.json")
    (folder / "phase_1" / "evil.pt").write_bytes(b"")
    with pytest.raises(StudentError, match="pickle files"):
        Manifest.read(folder)
    with pytest.raises(StudentError, match="does not exist"):
        Manifest.read(Path(tmp_path / "nowhere"))
