"""Wan 2.1 image-to-video (``WanImageToVideoPipeline`` without ``expand_timesteps``) on the tiny pipeline
(pdmd/teachers/tiny.py ``build_wan21_i2v``): given an image per prompt the teacher samples what the stock pipeline
samples (the condition latent and frame mask concatenated to every network input, the CLIP image embeds in both
guidance branches); Wan 2.2 I2V A14B's two networks come from the same code; without an image it refuses in one
line; and a phased student distilled on condition images reloads and samples the trainer's own experts' sample."""
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
from test_diffusers_teachers import fresh_accelerator_state  # noqa: F401  (autouse)
from test_card import PROMPT as CARD_PROMPT
from test_card import snippet, snippet_latents
from test_wan_i2v_training import config_of

from pdmd.cli import main
from pdmd.conditions import open_image
from pdmd.core.schedule import PhaseSchedule
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import MANIFEST
from pdmd.teachers import TeacherError, load_teacher
from pdmd.teachers.wan_i2v import IMAGE_CONDITION, IMAGE_EMBEDS, WanI2VTeacher
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

SIZE = {"height": 16, "width": 32, "num_frames": 5}  # latents (16, 2, 2, 4): 2 x 1 x 2 tokens
PROMPTS = ["a red cat on a sofa", "two blue dogs"]


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.1-i2v")


@pytest.fixture(scope="module")
def teacher(folder) -> WanI2VTeacher:
    return load_teacher(str(folder), **SIZE)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """One random image per prompt, at the teacher's size (so the VAE's side resizes neither)."""
    return random_images(SIZE, len(PROMPTS))


def with_sigmas(pipe, sigmas: list[float]):
    """``pipe`` running ``sigmas`` (already shifted) with a flow-matching Euler scheduler: it takes no sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps = lambda *args, device=None, **kwargs: \
        FlowMatchEulerDiscreteScheduler.set_timesteps(scheduler, sigmas=sigmas, device=device)
    pipe.scheduler = scheduler
    return pipe


def network_inputs(network, calls: list):
    return network.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)


def matches_the_stock_pipeline(teacher, pipe, images, schedule: PhaseSchedule) -> list:
    """Our batch of two against the stock pipeline one prompt at a time from the same noise row, CFG 3: latents
    to 1e-4. Returns the network inputs our sampling gave."""
    noise = teacher.noise(len(PROMPTS), 0)
    seen = []
    networks = teacher.model.values() if isinstance(teacher.model, torch.nn.ModuleDict) else [teacher.model]
    hooks = [network_inputs(network, seen) for network in networks]
    try:
        ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0, images=images).sample
    finally:
        for hook in hooks:
            hook.remove()
    for row, (prompt, image) in enumerate(zip(PROMPTS, images)):
        theirs = pipe(image=image, prompt=prompt, num_inference_steps=len(schedule.timesteps) - 1, guidance_scale=3.0,
                      latents=noise[row:row + 1].clone(), output_type="latent", **SIZE).frames
        torch.testing.assert_close(ours[row:row + 1], theirs, rtol=1e-4, atol=1e-4)
    return seen


def test_teacher_with_an_image_samples_what_the_i2v_pipeline_samples(teacher, folder, images):
    """The network sees 16 + 4 + 16 channels (latents, the frame mask -- ones on the first latent frame only --
    and the condition latent) and the CLIP tower's penultimate hidden states, the same in both branches; nothing
    is imposed on the sample."""
    from diffusers import WanImageToVideoPipeline

    assert teacher.conditions == ("image",) and teacher.latent_shape == (16, 2, 2, 4)
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    pipe = with_sigmas(WanImageToVideoPipeline.from_pretrained(str(folder)), list(schedule.timesteps[:-1]))
    assert not pipe.config.expand_timesteps and pipe.transformer.config.in_channels == 36
    seen = matches_the_stock_pipeline(teacher, pipe, images, schedule)
    assert len(seen) == 8 and seen[0]["hidden_states"].shape == (2, 36, 2, 2, 4)

    cond, uncond = teacher.encode(PROMPTS, images)
    mask = cond[IMAGE_CONDITION][:, :4]
    assert bool((mask[:, :, 0] == 1).all()) and bool((mask[:, :, 1:] == 0).all())
    assert cond[IMAGE_EMBEDS].shape == (2, 17, 32)  # (32 / 8)^2 patches + the class token, image_dim 32
    for key in (IMAGE_CONDITION, IMAGE_EMBEDS):
        assert torch.equal(cond[key], uncond[key])  # the image guides both branches
    assert torch.equal(seen[0]["encoder_hidden_states_image"], cond[IMAGE_EMBEDS])
    x = teacher.noise(2, 1)
    assert teacher.impose_conditions(x, cond) is x
    other = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0, images=images[::-1]).sample
    ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0, images=images).sample
    assert (other - ours).abs().mean() > 1e-3  # the image shapes the sample


def test_wan22_i2v_two_networks_switch_at_the_boundary_as_the_pipeline(tiny_pipeline, images):
    """Wan 2.2 I2V A14B (tiny.py ``build_wan22_i2v``): the same pipeline class with ``transformer_2`` and
    ``boundary_ratio`` and no image encoder (its transformers have no image_dim); steps at t >= 0.9 on
    ``transformer``, below on the other."""
    from diffusers import WanImageToVideoPipeline

    a14b = tiny_pipeline("wan2.2-i2v")
    teacher = load_teacher(str(a14b), **SIZE)
    assert teacher.network_names == ("transformer", "transformer_2") and teacher.image_encoder is None
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    assert schedule.timesteps[1] >= 0.9 > schedule.timesteps[2]  # two steps on each network
    pipe = with_sigmas(WanImageToVideoPipeline.from_pretrained(str(a14b)), list(schedule.timesteps[:-1]))
    seen = matches_the_stock_pipeline(teacher, pipe, images, schedule)
    assert all(call["encoder_hidden_states_image"] is None for call in seen)


def test_without_an_image_it_refuses_in_one_line(teacher, folder, capsys, tmp_path):
    line = f"{folder} is an image-to-video model and cannot run text-only: give one image per prompt (--image, or "
    line += "condition_images in a train config)"
    with pytest.raises(TeacherError, match=f"^{re.escape(line)}$"):
        teacher.sample(PROMPTS)
    assert main(["sample", "--teacher", str(folder), "--prompt", PROMPTS[0], "--steps", "1", "--height", "16",
                 "--width", "32", "--frames", "5", "--out", str(tmp_path / "none.mp4")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m pdmd sample: error: {line}"


def test_a_student_distilled_on_condition_images_samples_back_from_an_image(tmp_path, folder, images, capsys):
    """One update per phase on 2 condition images; the student reloads, and ``pdmd sample --student --image``
    draws the trainer's experts' sample; the image encoder went to the CPU with the text encoders."""
    condition = tmp_path / "images"
    condition.mkdir()
    for name, image in zip(("cat.png", "dog.png"), images):
        image.save(condition / name)
    (condition / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = TrainConfig.from_dict(config_of(tmp_path, folder, condition, **SIZE))
    trainer = Trainer(config)
    assert trainer.cond[IMAGE_CONDITION].shape == (2, 20, 2, 2, 4) and trainer.cond[IMAGE_EMBEDS].shape[0] == 2
    assert id(trainer.teacher.image_encoder) in trainer.teacher._offloaded
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    student = Path(result["student"])
    assert json.loads((student / MANIFEST).read_text())["conditions"] == ["image"]

    image, prompt = condition / "dog.png", PROMPTS[1]
    expected = trainer.teacher.sample([prompt], 3, config.schedule, config.student_cfg, trainer.experts,
                                      images=[open_image(image)]).sample
    reloaded = load_student(student).sample([prompt], seed=3, images=[open_image(image)]).sample
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-4)
    with trainer.roles.active(None):  # the base network alone
        plain = trainer.teacher.sample([prompt], 3, config.schedule, config.student_cfg,
                                       images=[open_image(image)]).sample
    assert (plain - expected).abs().max() > 1e-3  # the experts learnt something the student carries

    out = tmp_path / "student.png"  # the frames side by side: the decoded sample to within PNG rounding
    assert main(["sample", "--student", str(student), "--prompt", prompt, "--image", str(image), "--seed", "3",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 2
    from pdmd.media import as_stills, save_png
    save_png(as_stills(trainer.teacher.decode(expected)), tmp_path / "expected.png")
    ours, theirs = (np.asarray(Image.open(path)).astype(int) for path in (out, tmp_path / "expected.png"))
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1

    # the model card's snippet, stopped before the decode: the stock pipeline (its CLIP image encoder included)
    # with the phase LoRAs gives the student's latents from the same image
    code = snippet(str(render_card(student, repo_id=str(student))))
    assert "WanImageToVideoPipeline.from_pretrained" in code and "image=load_image(IMAGE)" in code
    shutil.copyfile(image, tmp_path / "first.png")
    latent = snippet_latents(code, tmp_path)
    ours = load_student(student).sample([CARD_PROMPT], seed=0, images=[open_image(image)]).sample
    torch.testing.assert_close(latent, ours, rtol=1e-4, atol=1e-4)


def test_the_plan_conditions_the_network_as_the_teacher_does(teacher, folder, images):
    """The planner's meta cond (pdmd.plan.memory.prompt_conditioning) has the shapes and dtypes of the real one,
    the image entries included, and its image encoder is counted beside the text encoder."""
    from pdmd.plan.architectures import meta_teacher
    from pdmd.plan.memory import PlanSettings, prompt_conditioning, weight_rows

    planned, _ = prompt_conditioning(meta_teacher(str(folder), **SIZE), len(PROMPTS))
    real, _ = teacher.encode(PROMPTS, images)
    assert {key: (value.shape, value.dtype) for key, value in planned.items()} == \
        {key: (value.shape, value.dtype) for key, value in real.items()}
    rows, _ = weight_rows(PlanSettings(teacher=str(folder), **SIZE))
    assert "image encoder (CLIPVisionModel)" in {row.name for row in rows}
