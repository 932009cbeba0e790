"""Data-free conditioned runs (``condition_teacher``, pdmd.training.conditioning): without condition images a run's
images are drawn from its prompts -- by the teacher itself (Wan 2.2 TI2V-5B, whose first frames they are) or by a
text-to-image teacher for one that cannot sample without an image (Wan 2.1 I2V, drawn here by the built-in
teacher) -- written to the run folder with their prompts.txt, read back on resume, and recorded in the manifest;
what cannot work is one line before any drawing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusers_teachers import fresh_accelerator_state  # noqa: F401  (autouse)
from test_wan21_i2v import SIZE as I2V_SIZE
from test_wan_i2v_training import config_of
from test_wan_ti2v import SIZE as TI2V_SIZE

from pdmd.conditions import PROMPTS_FILE
from pdmd.students.manifest import MANIFEST
from pdmd.training import conditioning
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.trainer import Trainer

PROMPTS = ["a red  cat\non a sofa", "two blue dogs"]  # the first one's whitespace is folded into one line


def drawn_config(tmp_path: Path, teacher: Path, drawer: str | None, size: dict, prompts=PROMPTS,
                 **overrides) -> TrainConfig:
    config = config_of(tmp_path, teacher, [], **{**size, **overrides}, prompts=list(prompts))
    del config["condition_images"]
    if drawer is not None:
        config["condition_teacher"] = drawer
    return TrainConfig.from_dict(config)


def test_the_teacher_draws_its_own_first_frames_and_a_resumed_run_reads_them_back(tmp_path, tiny_pipeline,
                                                                                monkeypatch):
    config = drawn_config(tmp_path, tiny_pipeline("wan2.2-ti2v"), "self", TI2V_SIZE)
    trainer = Trainer(config)
    folder = Path(config.output_dir) / "conditions"
    lines = (folder / PROMPTS_FILE).read_text().splitlines()
    assert lines == ["a red cat on a sofa", "two blue dogs"] and trainer.prompts == lines
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", PROMPTS_FILE]
    with trainer.roles.active(None):  # image k: the teacher's own sample of prompt k (one call), its first frame
        video = trainer.teacher.decode(trainer.teacher.sample(lines, seed=config.seed).sample)
    for k in range(2):
        drawn = np.asarray(Image.open(folder / f"{k:06d}.png")).astype(int)
        expected = (video[k, 0].permute(1, 2, 0).clamp(0, 1) * 255).round().numpy()
        assert drawn.shape == (*[TI2V_SIZE[n] for n in ("height", "width")], 3) and np.abs(drawn - expected).max() <= 1
    assert trainer.condition_image_count == 2

    result = trainer.fit(progress=False)
    manifest = json.loads((Path(result["student"]) / MANIFEST).read_text())
    assert manifest["conditions"] == ["image"] and manifest["condition_images"] == 2
    assert manifest["condition_source"] == "drawn by the teacher itself from the run's prompts"
    assert manifest["task"] == "image-to-video"
    assert "Conditions: 2 image(s) with their prompts (drawn by the teacher itself" in \
        (Path(result["student"]) / "README.md").read_text()

    def no_drawing(*args, **kwargs):
        raise AssertionError("a resumed run draws nothing")
    monkeypatch.setattr(type(trainer.teacher), "sample", no_drawing)
    again = Trainer(config)  # the same run folder: its drawing is finished, read as it is
    for key, value in trainer.cond.items():
        torch.testing.assert_close(again.cond[key], value)


def test_a_text_to_image_teacher_draws_for_an_image_to_video_teacher(tmp_path, tiny_pipeline):
    config = drawn_config(tmp_path, tiny_pipeline("wan2.1-i2v"), "builtin", I2V_SIZE,
                          prompts=["a red star on a dark background", "a blue circle on a light background"])
    trainer = Trainer(config)
    drawn = Image.open(Path(config.output_dir) / "conditions" / "000001.png")
    assert drawn.size == (32, 32)  # the built-in teacher's own size, fitted to 16 x 32 when encoded
    assert trainer.condition_image_count == 2 and trainer.condition_source == "drawn by builtin from the run's prompts"
    assert trainer.cond["image_condition"].shape[0] == 2  # the drawn first frames, encoded as given ones are


def test_what_a_teacher_cannot_take_is_one_line_before_any_drawing(tmp_path, tiny_pipeline, monkeypatch):
    def no_drawing(*args, **kwargs):
        raise AssertionError("nothing is drawn for a refused run")
    monkeypatch.setattr(conditioning, "draw_conditions", no_drawing)
    i2v, ti2v, t2v = (tiny_pipeline(name) for name in ("wan2.1-i2v", "wan2.2-ti2v", "wan2.1"))
    needs = (f"{i2v} cannot sample from prompts alone: give condition_images (a folder of images with its "
             "prompts.txt) or condition_teacher: a text-to-image teacher's id or folder, to draw them from the "
             "run's prompts")
    cases = [(i2v, None, I2V_SIZE, needs), (i2v, "self", I2V_SIZE, "condition_teacher: self: " + needs),
             (i2v, str(i2v), I2V_SIZE, f"condition_teacher: {i2v} cannot sample from prompts alone either: name a "
                                       "text-to-image teacher"),
             (t2v, "self", {"height": 16, "width": 16, "num_frames": 5},
              f"condition_teacher: {t2v} is a text-only teacher: it takes no image")]
    for teacher, drawer, size, message in cases:
        with pytest.raises(ConfigError) as refusal:
            Trainer(drawn_config(tmp_path / str(len(message)), teacher, drawer, size))
        assert str(refusal.value) == message
    text_only = Trainer(drawn_config(tmp_path / "ti2v", ti2v, None, TI2V_SIZE))  # TI2V-5B is text-to-video too
    assert text_only.condition_image_count == 0 and not (tmp_path / "ti2v" / "run" / "conditions").exists()

    with pytest.raises(ConfigError, match="^condition_images and condition_teacher both say"):
        TrainConfig.from_dict({"teacher": str(ti2v), "condition_images": str(tmp_path), "condition_teacher": "self"})
    with pytest.raises(ConfigError, match="^condition_teacher: the built-in teacher is a text-only teacher"):
        TrainConfig.from_dict({"teacher": "builtin", "condition_teacher": "self"})
    with pytest.raises(ConfigError, match="^sample_prompts: a run whose condition images are drawn"):
        Trainer(drawn_config(tmp_path / "grid", ti2v, "self", TI2V_SIZE, sample_prompts=["a fox"]))
