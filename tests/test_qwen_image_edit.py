"""Qwen-Image-Edit-2509 (``QwenImageEditPlusPipeline``) on the tiny pipeline (pdmd/teachers/tiny.py
``build_qwen_image_edit_plus``): given an image per prompt the teacher samples what the stock pipeline samples (the
prompt encoded with the image by the Qwen2.5-VL encoder's vision tower, the reference latent's tokens after the
noisy ones, true CFG with the same image in both branches); without an image it refuses in one line; a phased
student distilled on condition images reloads, samples back with ``pdmd sample --student --image``, and its model
card's diffusers snippet, run as written, loads its LoRAs into the stock pipeline and draws the same sample; and
the planner counts the reference tokens and the condition image's."""
from __future__ import annotations

import json
import re
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
from test_wan_i2v_training import config_of

from pdmd.cli import main
from pdmd.conditions import open_image
from pdmd.core.schedule import PhaseSchedule
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import MANIFEST
from pdmd.teachers import TeacherError, load_teacher
from pdmd.teachers.diffusers_base import pack_2x2, unpack_2x2
from pdmd.teachers.qwen_image_edit import REFERENCE_LATENTS, QwenImageEditPlusTeacher
from pdmd.training import conditioning
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

SIZE = {"height": 32, "width": 64}  # latents (4, 8, 16): 4 x 8 noisy tokens, as many reference ones
PROMPTS = ["make the cat red", "add two blue dogs"]


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("qwen-image-edit-plus")


@pytest.fixture(scope="module")
def teacher(folder) -> QwenImageEditPlusTeacher:
    return load_teacher(str(folder), **SIZE)


@pytest.fixture
def vae_area_of_the_teacher(monkeypatch):
    """The stock pipeline VAE-encodes its image at VAE_IMAGE_SIZE pixels (1024^2) whatever the output size; the
    teacher at its own size: the two agree where that area is the teacher's (a 1024x1024 teacher by default)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", SIZE["height"] * SIZE["width"])


def calls_of(module, calls: list):
    return module.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)


def test_teacher_with_an_image_samples_what_the_edit_plus_pipeline_samples(teacher, folder,
                                                                          vae_area_of_the_teacher):
    """Our batch of two against the stock pipeline one prompt at a time (it takes one) from the same noise row,
    true CFG 3 against " ": latents to 1e-4. The text encoder's vision tower reads the condition image (as many
    <|image_pad|> tokens as its merged patches), and every network call sees the noisy and the reference tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    assert teacher.conditions == ("image",) and teacher.needs_conditions and teacher.latent_shape == (4, 8, 16)
    images = random_images(SIZE, 2)
    schedule = PhaseSchedule.uniform(3, teacher.default_shift)
    encoder_calls, network_calls = [], []
    hooks = [calls_of(teacher.pipe.text_encoder, encoder_calls), calls_of(teacher.model, network_calls)]
    try:
        ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0, images=images).sample
    finally:
        for hook in hooks:
            hook.remove()
    pad = teacher.pipe.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_tokens = teacher.condition_image_tokens()
    # the condition image: a 384^2 area at aspect 2, sides rounded to 32 (256 x 544), then to 28 by the image
    # processor (252 x 532): 18 x 38 patches of 14, merged 2 x 2
    assert teacher.condition_size() == (256, 544) and image_tokens == 18 * 38 // 4
    for call in encoder_calls:
        assert int((call["input_ids"] == pad).sum()) == image_tokens == int(call["image_grid_thw"].prod()) // 4
        assert call["pixel_values"].shape[0] == 4 * image_tokens
    assert len(network_calls) == 6 and network_calls[0]["hidden_states"].shape == (2, 2 * 32, 16)
    assert network_calls[0]["img_shapes"] == [[(1, 4, 8), (1, 4, 8)]] * 2

    pipe = QwenImageEditPlusPipeline.from_pretrained(str(folder))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the sigmas given are already shifted
    noise = teacher.noise(len(PROMPTS), 0)
    for row, (prompt, image) in enumerate(zip(PROMPTS, images)):
        theirs = pipe(image=image, prompt=prompt, negative_prompt=" ", true_cfg_scale=3.0,
                      sigmas=list(schedule.timesteps[:-1]), num_inference_steps=3,
                      latents=pack_2x2(noise[row:row + 1]), output_type="latent", **SIZE).images
        torch.testing.assert_close(ours[row:row + 1], unpack_2x2(theirs, *teacher.latent_shape[1:]),
                                   rtol=1e-4, atol=1e-4)
    assert ours.abs().mean() > 0.1

    cond, uncond = teacher.encode(PROMPTS, images)
    assert torch.equal(cond[REFERENCE_LATENTS], uncond[REFERENCE_LATENTS])  # the image guides both branches
    assert cond[REFERENCE_LATENTS].shape == (2, 1, 4, 8, 16) and cond["prompt_embeds"].shape[:2] == \
        cond["prompt_embeds_mask"].shape == uncond["prompt_embeds_mask"].shape
    swapped, _ = teacher.encode(PROMPTS, images[::-1])
    seen_by_text = swapped["prompt_embeds"] - cond["prompt_embeds"]
    assert seen_by_text.abs().max() > 1e-3  # the vision tower's features are in the prompt embeddings
    other = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0, images=images[::-1]).sample
    assert (other - ours).abs().max() > 1e-3  # the image shapes the sample


def test_without_an_image_or_with_a_too_long_prompt_it_refuses_in_one_line(teacher, folder, capsys, tmp_path):
    line = f"{folder} is an image-editing model and cannot run text-only: give one image per prompt (--image, or "
    line += "condition_images in a train config)"
    with pytest.raises(TeacherError, match=f"^{re.escape(line)}$"):
        teacher.sample(PROMPTS)
    assert main(["sample", "--teacher", str(folder), "--prompt", PROMPTS[0], "--steps", "1", "--height", "32",
                 "--width", "64", "--out", str(tmp_path / "none.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m pdmd sample: error: {line}"
    long = "x" * (teacher.prompt_length + 1)  # one token a byte in the tiny tokenizer
    with pytest.raises(TeacherError, match=f"has {teacher.prompt_length + 1} tokens, more than the "
                                           f"{teacher.prompt_length} this teacher takes: shorten it$"):
        teacher.encode([long], random_images(SIZE, 1))


def test_two_images_per_prompt_sample_what_the_pipeline_samples_given_the_list(teacher, folder,
                                                                              vae_area_of_the_teacher):
    """Edit-Plus composes several images: a row's tuple is the pipeline's ``image=[...]`` ("Picture 1", "Picture 2",
    a reference grid each); rows of a batch take as many each, and more than the model card's three is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    images = random_images(SIZE, 4, seed=1)
    rows = [tuple(images[:2]), tuple(images[2:])]
    schedule = PhaseSchedule.uniform(2, teacher.default_shift)
    network_calls = []
    hook = calls_of(teacher.model, network_calls)
    try:
        ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0, images=rows).sample
    finally:
        hook.remove()
    assert network_calls[0]["img_shapes"] == [[(1, 4, 8)] * 3] * 2 and network_calls[0]["hidden_states"].shape[1] == 96
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(folder))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    noise = teacher.noise(len(PROMPTS), 0)
    for row, (prompt, pair) in enumerate(zip(PROMPTS, rows)):
        theirs = pipe(image=list(pair), prompt=prompt, negative_prompt=" ", true_cfg_scale=3.0,
                      sigmas=list(schedule.timesteps[:-1]), num_inference_steps=2,
                      latents=pack_2x2(noise[row:row + 1]), output_type="latent", **SIZE).images
        torch.testing.assert_close(ours[row:row + 1], unpack_2x2(theirs, *teacher.latent_shape[1:]),
                                   rtol=1e-4, atol=1e-4)
    swapped = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0, images=[r[::-1] for r in rows]).sample
    assert (swapped - ours).abs().max() > 1e-3  # the order is the pictures' numbering
    with pytest.raises(TeacherError, match=r"takes 1 to 3 images per prompt \(got 4\)$"):
        teacher.encode(PROMPTS[:1], [tuple(images)])
    with pytest.raises(TeacherError, match=r"need as many images each \(got \[1, 2\]\)$"):
        teacher.encode(PROMPTS, [images[0], tuple(images[1:3])])


def test_a_student_distilled_on_condition_images_loads_into_the_stock_pipeline(tmp_path, folder, capsys,
                                                                              monkeypatch):
    """One update per phase on 2 condition images encoded apart (two chunks of different prompt lengths, joined
    row-wise); the student reloads, ``pdmd sample --student --image`` draws the trainer's experts' sample, and the
    card's snippet (QwenImageEditPlusPipeline, ``load_lora_weights``, image=, true CFG 2 against " ") gives it too."""
    monkeypatch.setattr(conditioning, "IMAGES_PER_ENCODE", 1)
    condition = tmp_path / "images"
    condition.mkdir()
    for name, image in zip(("cat.png", "dog.png"), random_images(SIZE, 2, seed=1)):
        image.save(condition / name)
    (condition / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    spec = config_of(tmp_path, folder, condition, **SIZE, student_cfg=2.0)
    spec.pop("num_frames")  # config_of's TI2V size has frames; this teacher makes images
    config = TrainConfig.from_dict(spec)
    trainer = Trainer(config)
    at_once, _ = trainer.teacher.encode(PROMPTS, [open_image(condition / name) for name in ("cat.png", "dog.png")])
    for key in at_once:
        torch.testing.assert_close(trainer.cond[key], at_once[key], rtol=1e-5, atol=1e-6)
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    student = Path(result["student"])
    manifest = json.loads((student / MANIFEST).read_text())
    assert manifest["conditions"] == ["image"] and manifest["task"] == "image-to-image"

    image, prompt = condition / "dog.png", PROMPTS[1]
    expected = trainer.teacher.sample([prompt], 3, config.schedule, config.student_cfg, trainer.experts,
                                      images=[open_image(image)]).sample
    reloaded = load_student(student)
    torch.testing.assert_close(reloaded.sample([prompt], seed=3, images=[open_image(image)]).sample, expected,
                               rtol=1e-4, atol=1e-4)
    out = tmp_path / "student.png"
    assert main(["sample", "--student", str(student), "--prompt", prompt, "--image", str(image), "--seed", "3",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 4  # 2 steps, true CFG
    from pdmd.media import save_png
    save_png(trainer.teacher.decode(expected), tmp_path / "expected.png")
    ours, theirs = (np.asarray(Image.open(path)).astype(int) for path in (out, tmp_path / "expected.png"))
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1

    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 1024 * 1024)  # restored after the test
    card = str(render_card(student, repo_id=str(student)))
    assert "--image first.png" in card
    code = snippet(card)
    assert "QwenImageEditPlusPipeline.from_pretrained" in code and "image=load_image(IMAGE)" in code
    assert 'true_cfg_scale=2, negative_prompt=" "' in code
    shutil.copyfile(image, tmp_path / "first.png")
    run_snippet(code, tmp_path)  # as written: the decoded image, to within the PNG's rounding
    from_snippet = np.asarray(Image.open(tmp_path / "student.png")).astype(int)
    sample = reloaded.sample([CARD_PROMPT], seed=0, images=[open_image(image)]).sample
    save_png(trainer.teacher.decode(sample), tmp_path / "pdmd.png")
    assert np.abs(from_snippet - np.asarray(Image.open(tmp_path / "pdmd.png")).astype(int)).max() <= 1
    latent = snippet_latents(code, tmp_path)
    torch.testing.assert_close(unpack_2x2(latent, 8, 16), sample, rtol=1e-4, atol=1e-4)
    with trainer.roles.active(None):  # the base network alone
        plain = trainer.teacher.sample([CARD_PROMPT], 0, config.schedule, config.student_cfg,
                                       images=[open_image(image)]).sample
    assert (plain - sample).abs().max() > 1e-3  # the experts learnt something the snippet loads


def test_a_run_on_two_images_a_prompt_and_the_cli_with_two(tmp_path, folder, teacher, capsys):
    """A folder of folders: each prompt's two images, in name order, encoded as the teacher encodes a tuple; and
    ``--image`` given twice is one prompt's two images."""
    condition = tmp_path / "pairs"
    images = random_images(SIZE, 4, seed=2)
    for k, row in enumerate(("cat", "dog")):
        (condition / row).mkdir(parents=True)
        for j in range(2):
            images[2 * k + j].save(condition / row / f"{j}.png")
    (condition / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    spec = config_of(tmp_path, folder, condition, **SIZE)
    spec.pop("num_frames")
    trainer = Trainer(TrainConfig.from_dict(spec))
    pairs = [tuple(open_image(condition / row / f"{j}.png") for j in range(2)) for row in ("cat", "dog")]
    at_once, _ = trainer.teacher.encode(PROMPTS, pairs)
    assert trainer.cond[REFERENCE_LATENTS].shape == (2, 2, 4, 8, 16)
    for key in at_once:
        torch.testing.assert_close(trainer.cond[key], at_once[key], rtol=1e-5, atol=1e-6)

    out = tmp_path / "two.png"
    assert main(["sample", "--teacher", str(folder), "--prompt", PROMPTS[1], "--image", str(condition / "dog" / "0.png"),
                 "--image", str(condition / "dog" / "1.png"), "--steps", "2", "--seed", "3",
                 "--height", str(SIZE["height"]), "--width", str(SIZE["width"]), "--out", str(out)]) == 0
    expected = teacher.sample(PROMPTS[1:], 3, PhaseSchedule.uniform(2, teacher.default_shift), images=pairs[1:]).sample
    from pdmd.media import save_png
    save_png(teacher.decode(expected), tmp_path / "expected.png")
    ours, theirs = (np.asarray(Image.open(path)).astype(int) for path in (out, tmp_path / "expected.png"))
    assert np.abs(ours - theirs).max() <= 1


def test_the_plan_counts_the_reference_tokens_and_the_condition_image(capsys):
    """Qwen-Image-Edit-2509's shipped configs at 1024x1024: prompt_length prompt tokens after the condition
    image's 196, a 16 x 128 x 128 reference latent beside the noise (twice Qwen-Image's image tokens), and the
    plan command answers."""
    from pdmd.plan.architectures import meta_teacher
    from pdmd.plan.memory import prompt_conditioning

    teacher = meta_teacher("Qwen/Qwen-Image-Edit-2509")
    assert isinstance(teacher, QwenImageEditPlusTeacher) and teacher.latent_shape == (16, 128, 128)
    cond, uncond = prompt_conditioning(teacher, 1)
    assert cond["prompt_embeds"].shape == (1, teacher.prompt_length + 196, 3584)
    assert cond[REFERENCE_LATENTS].shape == (1, 1, 16, 128, 128) and uncond.keys() == cond.keys()
    calls = []
    hook = calls_of(teacher.model, calls)
    try:
        v = teacher.velocity(torch.zeros(1, *teacher.latent_shape, device="meta"), torch.ones(1), cond)
    finally:
        hook.remove()
    assert calls[0]["hidden_states"].shape == (1, 2 * 64 * 64, 64) and v.shape == (1, *teacher.latent_shape)
    assert main(["plan", "--teacher", "Qwen/Qwen-Image-Edit-2509", "--height", "256", "--width", "256",
                 "--json"]) == 0
    rows = {row["name"]: row["bytes"] for row in json.loads(capsys.readouterr().out)["components"]}
    assert rows["activations: generator update"] > 0 and "text encoder 1 (Qwen2_5_VLForConditionalGeneration)" in rows
