"""Wan 2.2 TI2V-5B as image-to-video: the tiny TI2V pipeline (pdmd/teachers/tiny.py ``build_wan22_ti2v``) given a
first-frame image per prompt samples what the stock ``WanImageToVideoPipeline`` (the same checkpoint,
``expand_timesteps``) samples; a text-only teacher refuses an image; ``pdmd sample --image`` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_conditions import random_images
from test_diffusers_teachers import random_student
from test_wan_ti2v import PROMPTS, SIZE, stock_pipeline

from pdmd.cli import main
from pdmd.core.schedule import PhaseSchedule
from pdmd.teachers import TeacherError, load_teacher
from pdmd.teachers.wan import FIRST_FRAME, WanTeacher


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.2-ti2v")


@pytest.fixture(scope="module")
def teacher(folder) -> WanTeacher:
    return load_teacher(str(folder), **SIZE)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """One random image per prompt, at the teacher's size (so neither side resizes it)."""
    return random_images(SIZE, len(PROMPTS))


def stock_i2v_pipeline(folder: Path, sigmas: list[float]):
    """WanImageToVideoPipeline from the same folder and components, running ``sigmas`` (its prompt cleaning calls
    ftfy unguarded in diffusers 0.42: requirements.txt has it)."""
    from diffusers import WanImageToVideoPipeline

    t2v = stock_pipeline(folder, sigmas)
    pipe = WanImageToVideoPipeline(**t2v.components, expand_timesteps=True)
    assert pipe.config.expand_timesteps and pipe.image_encoder is None
    return pipe


def timesteps_seen(network, calls: list):
    return network.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["timestep"]),
                                             with_kwargs=True)


def test_teacher_with_an_image_samples_what_the_i2v_pipeline_samples(teacher, folder, images):
    """Two prompts, each with its own image, in one batch; the stock pipeline one prompt at a time from the same
    noise row over the same timesteps, CFG 3: latents to 1e-4, the same per-token timesteps (0 on the first
    frame's tokens), and the first latent frame exactly the image's latent, decoded as the VAE decodes it alone."""
    assert teacher.conditions == ("image",)
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    noise = teacher.noise(len(PROMPTS), 0)
    ours_seen, theirs_seen = [], []
    hook = timesteps_seen(teacher.model, ours_seen)
    try:
        ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0, images=images)
    finally:
        hook.remove()
    assert ours.nfe == 8

    pipe = stock_i2v_pipeline(folder, list(schedule.timesteps[:-1]))
    timesteps_seen(pipe.transformer, theirs_seen)
    for row, (prompt, image) in enumerate(zip(PROMPTS, images)):
        theirs = pipe(image=image, prompt=prompt, num_inference_steps=4, guidance_scale=3.0,
                      latents=noise[row:row + 1].clone(), output_type="latent", **SIZE).frames
        torch.testing.assert_close(ours.sample[row:row + 1], theirs, rtol=1e-4, atol=1e-4)
    first_tokens = 1 * 2  # one latent frame of (2 / 2) x (4 / 2) patches
    assert ours_seen[0].shape == (2, 2 * first_tokens)
    assert bool((ours_seen[0][:, :first_tokens] == 0).all()) and bool((ours_seen[0][:, first_tokens:] > 0).all())
    torch.testing.assert_close(ours_seen[0][1], theirs_seen[8][0])  # row 2's first step (each call: cond, uncond)

    cond, uncond = teacher.encode(PROMPTS, images)
    assert torch.equal(cond[FIRST_FRAME], uncond[FIRST_FRAME])  # the image guides both branches
    assert torch.equal(ours.sample[:, :, :1], cond[FIRST_FRAME])
    frames = teacher.decode(ours.sample)
    torch.testing.assert_close(frames[:, 0], teacher.decode(cond[FIRST_FRAME])[:, 0], rtol=0, atol=1e-5)
    text_only = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0).sample
    assert (text_only - ours.sample)[:, :, 1:].abs().mean() > 0.05  # the image shapes the later frames too


def test_images_come_one_per_prompt_and_a_text_only_teacher_refuses_them(teacher, images):
    with pytest.raises(TeacherError, match=r"^1 image\(s\) for 2 prompt\(s\): give one image per prompt$"):
        teacher.encode(PROMPTS, images[:1])
    builtin = load_teacher("builtin")
    assert builtin.conditions == ()
    with pytest.raises(TeacherError, match="^builtin is a text-only teacher: it takes no image$"):
        builtin.sample(["a red star"], images=images[:1])


def test_cli_samples_with_an_image_and_refuses_bad_input_in_one_line(tmp_path, folder, teacher, images, capsys):
    image = tmp_path / "first.png"
    images[0].save(image)
    video = ["--teacher", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--height", "32", "--width", "64",
             "--frames", "5"]
    assert main(["sample", *video, "--image", str(image), "--out", str(tmp_path / "video.mp4")]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 4
    assert (tmp_path / "video.mp4").read_bytes()[4:8] == b"ftyp"  # an MP4 container

    def refused(arguments: list[str], message: str, out: Path = tmp_path / "refused.mp4") -> None:
        assert main(["sample", *arguments, "--out", str(out)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loaders' progress bars, if any
        assert last.startswith("python -m pdmd sample: error: ") and message in last and not out.exists()

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    refused([*video, "--image", str(not_an_image)], f"{not_an_image}: not an image this program reads")
    refused([*video, "--image", str(image), "--image", str(image)], f"{folder} takes one image per prompt (got 2)")
    refused(["--teacher", "builtin", "--prompt", "a red star", "--image", str(image)],
            "builtin is a text-only teacher: it takes no image", tmp_path / "refused.png")
    random_student(load_teacher(str(folder), **SIZE), PhaseSchedule((0.6,), (1, 1), 3.0), tmp_path / "student")
    refused(["--student", str(tmp_path / "student"), "--prompt", PROMPTS[0], "--image", str(image)],
            "was distilled on prompts alone: it takes no image")
