"""FLUX.1 Kontext (``FluxKontextPipeline``) as an editing teacher on the tiny pipeline (pdmd/teachers/tiny.py
``build_flux_kontext``): given an image per prompt it samples what the stock pipeline samples (the reference tokens
after the noisy ones in every call, their ids on the first axis 1); without one it is FLUX.1, as the pipeline with
``image=None``; a phased student distilled on condition images reloads, samples back from an image with ``pdmd
sample --student --image``, and its card's FluxKontextPipeline snippet, run as written, gives its latents; and the
planner counts the reference tokens, on the tiny pipeline and on the shipped FLUX.1 Kontext [dev] architecture."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_conditions import random_images
from test_card import PROMPT as CARD_PROMPT
from test_card import run_snippet, snippet, snippet_latents
from test_diffusers_teachers import fresh_accelerator_state  # noqa: F401  (autouse)
from test_wan21_i2v import network_inputs
from test_wan_i2v_training import config_of

from pdmd.cli import main
from pdmd.conditions import open_image
from pdmd.core.schedule import PhaseSchedule
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import MANIFEST
from pdmd.teachers import load_teacher
from pdmd.teachers.diffusers_base import pack_2x2, unpack_2x2
from pdmd.teachers.flux_kontext import REFERENCE_LATENTS, FluxKontextTeacher
from pdmd.training import conditioning
from pdmd.training.config import TrainConfig
from pdmd.training.steps import select
from pdmd.training.trainer import Trainer

SIZE = {"height": 16, "width": 32}  # latents (4, 8, 16): 4 x 8 = 32 tokens, and as many reference tokens
PROMPTS = ["make the cat red", "two blue dogs instead"]
GUIDANCE = 2.5


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("flux-kontext")


@pytest.fixture(scope="module")
def teacher(folder) -> FluxKontextTeacher:
    return load_teacher(str(folder), **SIZE)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """One random image per prompt at the teacher's size, so neither side resizes it."""
    return random_images(SIZE, len(PROMPTS))


def stock_latents(folder: Path, schedule: PhaseSchedule, noise, images: list | None) -> torch.Tensor:
    """The stock FluxKontextPipeline, one prompt at a time from our noise rows over our timesteps: at the teacher's
    size (``max_area``), the image as given (``_auto_resize=False``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(str(folder))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the timesteps are already shifted
    sigmas = list(schedule.timesteps[:-1])
    rows = []
    for row, prompt in enumerate(PROMPTS):
        latents = pipe(image=None if images is None else images[row], prompt=prompt, num_inference_steps=len(sigmas),
                       sigmas=sigmas, guidance_scale=GUIDANCE, max_area=SIZE["height"] * SIZE["width"],
                       _auto_resize=False, latents=pack_2x2(noise[row:row + 1]), output_type="latent", **SIZE).images
        rows.append(unpack_2x2(latents, SIZE["height"] // 2, SIZE["width"] // 2))
    return torch.cat(rows)


def test_teacher_with_an_image_samples_what_the_kontext_pipeline_samples(teacher, folder, images):
    """The network sees the 32 noisy tokens then the 32 reference tokens, ids 0 then 1 on the first axis; the
    reference is the VAE's normalised posterior mode, one row per image, and the image shapes the sample."""
    assert teacher.conditions == ("image",) and not teacher.needs_conditions and teacher.guidance_embedded
    assert (teacher.default_cfg, teacher.default_steps) == (GUIDANCE, 28)
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    seen = []
    hook = network_inputs(teacher.model, seen)
    try:
        ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=GUIDANCE, images=images).sample
    finally:
        hook.remove()
    theirs = stock_latents(folder, schedule, teacher.noise(len(PROMPTS), 0), images)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert len(seen) == 4 and seen[0]["hidden_states"].shape == (2, 64, 16)
    ids = seen[0]["img_ids"]
    assert bool((ids[:32, 0] == 0).all()) and bool((ids[32:, 0] == 1).all())
    assert torch.equal(ids[:32, 1:], ids[32:, 1:])  # the reference on the output's grid

    cond, uncond = teacher.encode(PROMPTS, images)
    assert uncond is None and cond[REFERENCE_LATENTS].shape == (2, 4, 8, 16)
    assert torch.equal(seen[0]["hidden_states"][:, 32:], pack_2x2(cond[REFERENCE_LATENTS]))
    one, _ = teacher.encode(PROMPTS[1:], images[1:])
    for key in cond:  # a row's encoding is its own: the trainer draws rows of it (steps.select)
        torch.testing.assert_close(select(cond, slice(1, 2))[key], one[key], rtol=1e-5, atol=1e-6)
    other = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=GUIDANCE, images=images[::-1]).sample
    assert (other - ours).abs().mean() > 1e-4  # the image shapes the sample, beyond the tolerance above


def test_without_an_image_it_is_flux1_as_the_pipeline_with_no_image(teacher, folder):
    """Kontext [dev] samples from prompts alone: no reference tokens, the stock pipeline's image=None loop."""
    schedule = PhaseSchedule.uniform(3, teacher.default_shift)
    seen = []
    hook = network_inputs(teacher.model, seen)
    try:
        ours = teacher.sample(PROMPTS, seed=1, schedule=schedule, cfg=GUIDANCE).sample
    finally:
        hook.remove()
    assert seen[0]["hidden_states"].shape == (2, 32, 16) and REFERENCE_LATENTS not in teacher.encode(PROMPTS)[0]
    theirs = stock_latents(folder, schedule, teacher.noise(len(PROMPTS), 1), None)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_student_distilled_on_condition_images_samples_back_and_loads_into_the_pipeline(tmp_path, folder, images,
                                                                                        capsys, monkeypatch):
    """One update per phase on 2 (image, prompt) pairs encoded a pair at a time; the student reloads and
    ``pdmd sample --student --image`` draws the trainer's experts' sample; the card's snippet loads the phase LoRAs
    into the stock FluxKontextPipeline with load_lora_weights and, run as written, gives the student's latents."""
    monkeypatch.setattr(conditioning, "IMAGES_PER_ENCODE", 1)  # two chunks, joined row-wise
    condition = tmp_path / "images"
    condition.mkdir()
    for name, image in zip(("cat.png", "dogs.png"), images):
        image.save(condition / name)
    (condition / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = TrainConfig.from_dict(config_of(tmp_path, folder, condition, **SIZE, num_frames=None))
    trainer = Trainer(config)
    at_once, _ = trainer.teacher.encode(PROMPTS, images)
    assert trainer.prompts == PROMPTS and trainer.cond[REFERENCE_LATENTS].shape == (2, 4, 8, 16)
    for key in at_once:
        torch.testing.assert_close(trainer.cond[key], at_once[key], rtol=1e-5, atol=1e-6)
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    student = Path(result["student"])
    manifest = json.loads((student / MANIFEST).read_text())
    assert manifest["conditions"] == ["image"] and manifest["family"] == "flux"

    image, prompt = condition / "dogs.png", PROMPTS[1]
    expected = trainer.teacher.sample([prompt], 3, config.schedule, config.student_cfg, trainer.experts,
                                      images=[open_image(image)]).sample
    reloaded = load_student(student).sample([prompt], seed=3, images=[open_image(image)]).sample
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-4)
    out = tmp_path / "student.png"
    assert main(["sample", "--student", str(student), "--prompt", prompt, "--image", str(image), "--seed", "3",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 2
    from pdmd.media import save_png
    save_png(trainer.teacher.decode(expected), tmp_path / "expected.png")
    ours, theirs = (np.asarray(Image.open(path)).astype(int) for path in (out, tmp_path / "expected.png"))
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1

    card = str(render_card(student, repo_id=str(student)))
    assert "--image first.png" in card and "- image-to-image" in card
    code = snippet(card)
    assert "FluxKontextPipeline.from_pretrained" in code and "image=load_image(IMAGE)" in code
    assert "max_area=512, _auto_resize=False" in code
    shutil.copyfile(image, tmp_path / "first.png")
    run_snippet(code, tmp_path)
    assert Image.open(tmp_path / "student.png").size == (SIZE["width"], SIZE["height"])
    latent = snippet_latents(code, tmp_path)
    ours = load_student(student).sample([CARD_PROMPT], seed=0, images=[open_image(image)]).sample
    torch.testing.assert_close(unpack_2x2(latent, 8, 16), ours, rtol=1e-4, atol=1e-4)
    with trainer.roles.active(None):  # the base network alone
        plain = trainer.teacher.sample([CARD_PROMPT], 0, config.schedule, config.student_cfg,
                                       images=[open_image(image)]).sample
    assert (plain - ours).abs().max() > 1e-3  # the experts learnt something the snippet loads


def test_a_text_only_students_card_keeps_the_pipelines_output_size(tmp_path, folder):
    """A student distilled text-to-image (``condition_teacher: none``) loads as DiffusionPipeline, which is
    FluxKontextPipeline for this teacher: the manifest records the class, so the snippet passes max_area (the
    pipeline would rescale the output to 1024^2 pixels) and no image keywords, and gives the student's latents."""
    from test_diffusers_teachers import random_student

    schedule = PhaseSchedule((0.6,), (1, 1), 3.0)
    random_student(load_teacher(str(folder), **SIZE), schedule, tmp_path / "student", student_cfg=GUIDANCE)
    manifest = json.loads((tmp_path / "student" / MANIFEST).read_text())
    assert manifest["pipeline"] == "FluxKontextPipeline" and manifest["task"] == "text-to-image"
    code = snippet(str(render_card(tmp_path / "student", repo_id=str(tmp_path / "student"))))
    assert "DiffusionPipeline.from_pretrained" in code and "max_area=512, generator" in code
    assert "_auto_resize" not in code and "load_image" not in code
    latent = snippet_latents(code, tmp_path)
    ours = load_student(tmp_path / "student").sample([CARD_PROMPT], seed=0).sample
    torch.testing.assert_close(unpack_2x2(latent, 8, 16), ours, rtol=1e-4, atol=1e-4)


def test_the_plan_counts_the_reference_tokens(teacher, folder, images):
    """The planner's meta cond has the real one's shapes and dtypes; on the shipped Kontext [dev] architecture
    every traced activation is FLUX.1-dev's at twice the image tokens (512 text + 2 x 16 image tokens at 64x64
    either way), more than FLUX.1-dev's at the same size."""
    from pdmd.plan.architectures import meta_teacher
    from pdmd.plan.memory import PlanSettings, inference_activation_rows, prompt_conditioning, \
        training_activation_rows

    planned, uncond = prompt_conditioning(meta_teacher(str(folder), **SIZE), len(PROMPTS))
    real, _ = teacher.encode(PROMPTS, images)
    assert uncond is None and {key: (value.shape, value.dtype) for key, value in planned.items()} == \
        {key: (value.shape, value.dtype) for key, value in real.items()}

    def traced(name: str, height: int, width: int) -> dict[str, int]:
        settings = PlanSettings(teacher=name, height=height, width=width)
        rows = [*inference_activation_rows(settings), *training_activation_rows(settings)]
        return {row.name: row.bytes for row in rows if "decode" not in row.name}

    kontext = traced("black-forest-labs/FLUX.1-Kontext-dev", 64, 64)
    dev, dev_wider = traced("black-forest-labs/FLUX.1-dev", 64, 64), traced("black-forest-labs/FLUX.1-dev", 64, 128)
    assert set(kontext) == set(dev) and len(kontext) == 3
    for name, planned_bytes in kontext.items():
        assert planned_bytes > dev[name] and planned_bytes == pytest.approx(dev_wider[name], rel=1e-3), name
