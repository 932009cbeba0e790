"""A finished student's model card (README.md), its LoRA metadata and file names, and ``pdmd push``."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_diffusers_teachers import EXPERT_SPLIT, SIZES, fresh_accelerator_state, random_student, tiny_config  # noqa: F401

from pdmd.core.schedule import PhaseSchedule
from pdmd.students import lora_formats
from pdmd.students.card import CARD, SAMPLE_GRID, render_card, write_card
from pdmd.students.folder import load_student
from pdmd.teachers import load_teacher
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a cat sitting on a windowsill"  # the card's example prompt for a diffusers teacher


def snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.DOTALL)[1]


def run_snippet(code: str, where: Path) -> dict:
    namespace = {}
    previous = Path.cwd()
    try:
        os.chdir(where)
        exec(compile(code, "model-card-snippet", "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace


def snippet_latents(code: str, where: Path):
    """The snippet run as written up to its pipeline call, that call returning latents (its result's ``frames``
    or ``images``): what pdmd's student samples, before the lossy decode and file."""
    latent = code.replace("callback_on_step_end=switch_phase)",
                          "callback_on_step_end=switch_phase, output_type='latent')")
    result = run_snippet(re.split(r"\n(?:video|image) = result", latent)[0], where)["result"]
    return result.frames if hasattr(result, "frames") else result.images


def test_a_trained_tiny_students_card_renders_its_schedule_training_and_usage(tmp_path, tiny_pipeline):
    config = TrainConfig.from_dict(tiny_config(tmp_path, "sd3", folder=tiny_pipeline("sd3")))
    folder = Path(Trainer(config).fit(progress=False)["student"])
    text = (folder / CARD).read_text()
    front = text.split("---")[1]
    assert "library_name: diffusers" in front and "- phased-dmd" in front and "license:" in front
    assert "base_model" not in front  # a local folder is no Hub id
    assert "| 1 | 1 | 0.8 | 1 |" in text and "| 2 | 0.8 | 0 | 1 |" in text  # phase, t range, steps
    assert "Budget: 2 generator updates, per phase [1, 1]" in text and "min of updates" in text
    assert f"![sample grid]({SAMPLE_GRID})" in text and (folder / SAMPLE_GRID).is_file()
    code = snippet(text)
    assert "pipe.load_lora_weights(STUDENT" in code and "PHASE_STARTS = {1: 'phase_2'}" in code
    assert "LoraLoaderModelOnly" in text and "--layout comfyui" in text
    manifest = json.loads((folder / "manifest.json").read_text())
    for relative in manifest["phases"]:  # each LoRA file carries the whole schedule
        with safe_open(str(folder / relative), framework="pt") as handle:
            assert json.loads(handle.metadata()["pdmd_schedule"]) == manifest["schedule"]


def test_the_cards_diffusers_snippet_as_written_reproduces_pdmd_sample(tmp_path, tiny_pipeline):
    teacher = load_teacher(str(tiny_pipeline("sd3")), **SIZES["sd3"])
    random_student(teacher, PhaseSchedule((0.6,), (2, 2), teacher.default_shift), tmp_path / "student")
    code = snippet(str(render_card(tmp_path / "student", repo_id=str(tmp_path / "student"))))
    run_snippet(code, tmp_path)
    done = subprocess.run([sys.executable, "-m", "pdmd", "sample", "--student", str(tmp_path / "student"),
                           "--prompt", PROMPT, "--seed", "0", "--out", str(tmp_path / "pdmd.png")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = (np.asarray(Image.open(tmp_path / name)).astype(int) for name in ("pdmd.png", "student.png"))
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1 and ours.std() > 5


def test_wan22_card_loads_the_low_noise_lora_into_transformer_2_and_matches_the_student(tmp_path, tiny_pipeline):
    teacher = load_teacher(str(tiny_pipeline("wan2.2")), **SIZES["wan2.2"])
    random_student(teacher, PhaseSchedule.from_dict({**EXPERT_SPLIT, "steps": [2, 2]}), tmp_path / "student")
    code = snippet(str(render_card(tmp_path / "student", repo_id=str(tmp_path / "student"))))
    assert 'adapter_name="phase_2", load_into_transformer_2=True' in code and "num_frames=5" in code
    run_snippet(code, tmp_path)  # as written: an mp4
    assert (tmp_path / "student.mp4").stat().st_size > 0
    # the same code stopped before the decode: its latents are the student's (mp4 encoding is lossy)
    latent = snippet_latents(code, tmp_path)
    student = load_student(tmp_path / "student")
    torch.testing.assert_close(latent, student.sample([PROMPT], seed=0).sample, rtol=1e-4, atol=1e-5)


def test_a_two_network_export_names_each_file_by_its_network(tmp_path, tiny_pipeline):
    teacher = load_teacher(str(tiny_pipeline("wan2.2")), **SIZES["wan2.2"])
    random_student(teacher, PhaseSchedule.from_dict(EXPERT_SPLIT), tmp_path / "wan-student")
    written = lora_formats.export_student(tmp_path / "wan-student", tmp_path / "out", "comfyui")
    assert [p.name for p in written] == ["wan-student-phase_1-high_noise-comfyui.safetensors",
                                         "wan-student-phase_2-low_noise-comfyui.safetensors"]
    with safe_open(str(written[1]), framework="pt") as handle:
        assert handle.metadata()["pdmd_network"] == "transformer_2"
        assert json.loads(handle.metadata()["pdmd_schedule"])["boundaries"] == [0.8]


# --- push -----------------------------------------------------------------------------------------------------
@pytest.fixture
def pushable(tmp_path):
    from ui_fixtures import make_student

    folder = make_student(tmp_path / "run" / "student")
    write_card(folder)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step-1.safetensors").write_bytes(b"x")
    (folder / "optimizer.safetensors").write_bytes(b"x")
    return folder


def call_push(capsys, *argv) -> tuple[int, str, str]:
    from pdmd.cli import main

    code = main(["push", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_dry_run_lists_exactly_the_students_files(pushable, capsys):
    code, out, _ = call_push(capsys, "--student", str(pushable), "--repo", "me/tiny", "--dry-run")
    assert code == 0
    assert json.loads(out)["files"] == ["README.md", "manifest.json", "phase_1/pytorch_lora_weights.safetensors",
                                        "phase_2/pytorch_lora_weights.safetensors"]


def test_push_without_token_or_network_fails_at_once_with_one_line(pushable, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    code, _, err = call_push(capsys, "--student", str(pushable), "--repo", "me/tiny")
    assert code == 2 and err.count("\n") == 1 and "no Hugging Face token" in err
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_fake")
    monkeypatch.setattr("pdmd.teachers._hub_resolves", lambda: False)
    code, _, err = call_push(capsys, "--student", str(pushable), "--repo", "me/tiny")
    assert code == 2 and err.count("\n") == 1 and "cannot be reached" in err


def test_push_refuses_a_bad_repo_id_and_a_folder_that_is_no_student(tmp_path, capsys):
    assert "must be OWNER/NAME" in call_push(capsys, "--student", str(tmp_path), "--repo", "no-owner")[2]
    code, _, err = call_push(capsys, "--student", str(tmp_path / "missing"), "--repo", "me/tiny", "--dry-run")
    assert code == 2 and "does not exist" in err


def test_the_train_tab_offers_the_card_and_pushes_only_where_training_is_open(pushable, monkeypatch):
    import types

    from pdmd.training.gate import Gate
    from pdmd.training.run_folder import RunFolder
    from ui.train_publish import on_card, on_push

    job = types.SimpleNamespace(id=1, name="tiny", finished=True, student=pushable, run=RunFolder(pushable.parent))
    manager = types.SimpleNamespace(jobs=lambda: [job])
    path, status = on_card(manager, 1)
    assert Path(path).read_text() == (pushable / CARD).read_text() and "✓" in status
    assert "only a finished job" in on_card(manager, 2)[1]
    assert "only possible where training is open" in on_push(manager, Gate("off"), 1, "me/tiny", True)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert "no Hugging Face token" in on_push(manager, Gate("on"), 1, "me/tiny", True)
    assert "must be OWNER/NAME" in on_push(manager, Gate("on"), 1, "../x", True)
