"""A phased student of Wan 2.2 TI2V-5B distilled on condition images (``condition_images``) on the tiny TI2V
pipeline: the run finishes, its manifest says the student takes an image, and sampling it back (Python and
``pdmd sample --student --image``, the model card's WanImageToVideoPipeline snippet) gives the trainer's own
experts' sample, the first frame the condition's latent; bad condition images and a text-only teacher are refused in
one line before the run folder fills; and the impose rule of the method (docs/method.md §6) fixes the first frame
in x_s and in the teacher's regression pairs, and keeps it out of the gradient."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_conditions import random_images
from test_diffusers_teachers import SIZES, fresh_accelerator_state  # noqa: F401  (autouse)
from test_card import PROMPT as CARD_PROMPT
from test_card import run_snippet, snippet, snippet_latents
from test_wan_ti2v import SIZE

from pdmd.cli import main
from pdmd.conditions import open_image
from pdmd.core import distill
from pdmd.core.schedule import PhaseSchedule
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import MANIFEST
from pdmd.teachers import load_teacher
from pdmd.teachers.wan import FIRST_FRAME
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training import conditioning
from pdmd.training.trainer import Trainer

PAIRS = {"cat.png": "the cat jumps", "dog.png": "the dog runs"}


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.2-ti2v")


@pytest.fixture
def images(tmp_path) -> Path:
    """Two random PNGs at the teacher's size (so no side resizes them) and their prompts.txt."""
    images = tmp_path / "images"
    images.mkdir()
    for name, image in zip(PAIRS, random_images(SIZE, len(PAIRS))):
        image.save(images / name)
    (images / "prompts.txt").write_text("\n".join(PAIRS.values()) + "\n")
    return images


def config_of(tmp_path: Path, teacher: Path | str, images, **overrides) -> dict:
    return dict(teacher=str(teacher), method="phased", schedule={"boundaries": [0.8], "steps": [1, 1]},
                updates_per_phase=1, batch_size=1, fake_ratio=1, lora={"rank": 2, "alpha": 4}, sample_every=2,
                checkpoint_every=100, lr_generator=1e-2, teacher_cfg=3.0, output_dir=str(tmp_path / "run"),
                condition_images=images if isinstance(images, list) else str(images), **{**SIZE, **overrides})


def test_a_student_distilled_on_condition_images_samples_back_from_an_image(tmp_path, folder, images, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr(conditioning, "IMAGES_PER_ENCODE", 1)  # two chunks, joined row-wise
    config = TrainConfig.from_dict(config_of(tmp_path, folder, images))
    trainer = Trainer(config)
    assert trainer.prompts == list(PAIRS.values()) and trainer.cond[FIRST_FRAME].shape == (2, 48, 1, 2, 4)
    at_once, _ = trainer.teacher.encode(list(PAIRS.values()), [open_image(images / name) for name in PAIRS])
    for key in at_once:  # the same rows (a batch of one may round differently from a batch of two)
        torch.testing.assert_close(trainer.cond[key], at_once[key], rtol=1e-5, atol=1e-6)
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    student = Path(result["student"])
    manifest = json.loads((student / MANIFEST).read_text())
    assert manifest["conditions"] == ["image"] and manifest["condition_images"] == 2

    image = images / "dog.png"
    prompt = PAIRS["dog.png"]
    expected = trainer.teacher.sample([prompt], 3, config.schedule, config.student_cfg, trainer.experts,
                                      images=[open_image(image)]).sample
    reloaded = load_student(student).sample([prompt], seed=3, images=[open_image(image)]).sample
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-4)
    condition = trainer.teacher.encode([prompt], [open_image(image)])[0][FIRST_FRAME]
    assert torch.equal(reloaded[:, :, :1], condition)

    out = tmp_path / "student.png"  # the frames side by side: the decoded sample to within PNG rounding
    assert main(["sample", "--student", str(student), "--prompt", prompt, "--image", str(image), "--seed", "3",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 2
    from pdmd.media import as_stills, save_png
    save_png(as_stills(trainer.teacher.decode(expected)), tmp_path / "expected.png")
    ours, theirs = (np.asarray(Image.open(path)).astype(int) for path in (out, tmp_path / "expected.png"))
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1

    assert main(["sample", "--student", str(student), "--prompt", prompt, "--out", str(tmp_path / "none.png")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"python -m pdmd sample: error: {student} was distilled on 2 condition image(s): give one image "
                    "per prompt (--image)")

    # the model card's diffusers snippet (WanImageToVideoPipeline, image=) run as written, then stopped before the
    # decode: its latents are the student's from the same image (an mp4 is lossy)
    card = str(render_card(student, repo_id=str(student)))
    assert "--image first.png" in card and "- image-to-video" in card
    code = snippet(card)
    assert "WanImageToVideoPipeline.from_pretrained" in code and "image=load_image(IMAGE)" in code
    shutil.copyfile(image, tmp_path / "first.png")
    run_snippet(code, tmp_path)
    assert (tmp_path / "student.mp4").stat().st_size > 0
    latent = snippet_latents(code, tmp_path)
    ours = load_student(student).sample([CARD_PROMPT], seed=0, images=[open_image(image)]).sample
    torch.testing.assert_close(latent, ours, rtol=1e-4, atol=1e-4)
    with trainer.roles.active(None):  # the base network alone
        plain = trainer.teacher.sample([CARD_PROMPT], 0, config.schedule, config.student_cfg,
                                       images=[open_image(image)])
    assert (plain.sample - ours)[:, :, 1:].abs().max() > 1e-3  # the experts learnt something the snippet loads


def refused(tmp_path: Path, config: dict, capsys) -> str:
    """``pdmd train`` on ``config``: exit 2, and the one line it printed; the run folder has nothing in it."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m pdmd train")]
    run = Path(config["output_dir"])
    assert len(lines) == 1 and not (run.exists() and any(run.iterdir()))
    return lines[0]


def test_bad_condition_images_and_text_only_teachers_are_refused_before_the_run(tmp_path, folder, images,
                                                                               tiny_pipeline, capsys):
    bad = images / "cat.png"
    bad.write_text("not a picture")
    line = refused(tmp_path, config_of(tmp_path, folder, images), capsys)
    assert line == (f"python -m pdmd train: error: condition_images: {bad}: not an image this program reads (PNG, "
                    "JPEG, WEBP)")
    with pytest.raises(ConfigError, match="^condition_images: the built-in teacher is a text-only teacher"):
        TrainConfig.from_dict({"teacher": "builtin", "condition_images": [str(images / "dog.png")]})

    wan21 = tiny_pipeline("wan2.1")
    text_only = config_of(tmp_path, wan21, [str(images / "dog.png")], **SIZES["wan2.1"], prompts=["a dog"])
    line = refused(tmp_path, text_only, capsys)
    assert line == f"python -m pdmd train: error: condition_images: {wan21} is a text-only teacher: it takes no image"


def test_the_impose_rule_fixes_the_first_frame_and_keeps_it_out_of_the_gradient(folder, images):
    """rollout's x_s holds the condition's latent in the first frame, with no gradient path into it; both x0
    estimates of generator_loss hold it too, so the DMD2 gradient there is exactly zero; and the fake score's loss
    is over the other frames."""
    teacher = load_teacher(str(folder), **SIZE)
    pairs = [(images / name, prompt) for name, prompt in PAIRS.items()]
    cond, uncond = teacher.encode([p for _, p in pairs], [open_image(f) for f, _ in pairs])
    schedule = PhaseSchedule((0.6,), (1, 2), 3.0)
    noise = teacher.noise(2, 0).requires_grad_()
    x_s, s = distill.rollout([teacher.velocity] * 2, 1, schedule, noise, cond, impose=teacher.impose_conditions)
    assert torch.equal(x_s[:, :, :1], cond[FIRST_FRAME])
    free = x_s.detach().clone().requires_grad_()
    loss, _ = distill.generator_loss(free, s, teacher.velocity, teacher.velocity, cond, uncond, 3.0,
                                     generator=torch.Generator().manual_seed(0), impose=teacher.impose_conditions)
    loss.backward()
    assert bool((free.grad[:, :, :1] == 0).all()) and free.grad[:, :, 1:].abs().sum() > 0
    states = distill.teacher_states(teacher.velocity, schedule, noise.detach(), cond, uncond, 3.0, steps_per_phase=1,
                                    impose=teacher.impose_conditions)  # the regression warm start's pairs
    assert all(torch.equal(state[:, :, :1], cond[FIRST_FRAME]) for state in states[1:])
    assert distill.unconditioned(noise, cond) is noise  # a text-only teacher's rule changes nothing

    # the fake score's Eq. (20) leaves the fixed frame out: its output there gets no gradient, the rest the mean's
    output = torch.randn_like(x_s, requires_grad=True)
    distill.fake_loss(lambda x, t, c: output, x_s.detach(), s, cond, generator=torch.Generator().manual_seed(0),
                      impose=teacher.impose_conditions).backward()
    assert bool((output.grad[:, :, :1] == 0).all()) and bool((output.grad[:, :, 1:] != 0).all())
    plain = distill.fake_loss(lambda x, t, c: output, x_s.detach(), s, cond, generator=torch.Generator().manual_seed(0))
    assert distill.free_entries(x_s, cond, distill.unconditioned) is None and plain.item() > 0  # text-only: plain mean
