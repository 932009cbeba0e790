"""Wan 2.2 I2V A14B end to end on its tiny pipeline (pdmd/teachers/tiny.py ``build_wan22_i2v``: two networks on
16 + 16 + 4 input channels, switching at t = 0.9, no image encoder): a phased student distilled on condition
images, one phase per network, reloads and samples the trainer's own experts' sample from an image, ``pdmd sample
--student --image`` draws it, and the model card's snippet loads its phase LoRAs into the stock
WanImageToVideoPipeline (the low-noise one with ``load_into_transformer_2``) and reproduces its latents; a
Wan2.2-Lightning I2V pair in its published layout imports as a published student that samples what the stock
pipeline samples with the two files loaded; and the shipped architecture plans the real checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_card import PROMPT as CARD_PROMPT
from test_card import run_snippet, snippet, snippet_latents
from test_diffusers_teachers import fresh_accelerator_state  # noqa: F401  (autouse)
from test_lora_formats import wan_lightning_file
from test_wan21_i2v import PROMPTS, SIZE, images, with_sigmas  # noqa: F401  (images: a fixture)
from test_wan_i2v_training import config_of

from pdmd.cli import main
from pdmd.conditions import open_image
from pdmd.core.schedule import PhaseSchedule
from pdmd.students import lora_formats as lf
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import MANIFEST, Manifest
from pdmd.teachers import load_teacher
from pdmd.teachers.wan_i2v import IMAGE_CONDITION, IMAGE_EMBEDS
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

HUB_ID = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
NETWORKS = ["transformer", "transformer_2"]
# I2V A14B switches networks at t = 0.9 (T2V A14B at 0.875) and a step starting there runs on the high-noise one,
# so the phase boundary sits just below: phase 1 (t = 1, 0.955) on ``transformer``, phase 2 on ``transformer_2``
SPLIT = {"boundaries": [0.89], "steps": [2, 1], "shift": 5.0}
# Wan2.2-Lightning I2V's 2 + 2 steps at shift 5, each pair on one network
LIGHTNING_I2V = PhaseSchedule((0.89,), (2, 2), 5.0)


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.2-i2v")


@pytest.fixture(scope="module")
def teacher(folder):
    return load_teacher(str(folder), **SIZE)


def test_a_phased_student_loads_into_the_stock_pipeline_and_reproduces_pdmd_sample(tmp_path, folder, images, capsys):
    condition = tmp_path / "images"
    condition.mkdir()
    for name, image in zip(("cat.png", "dog.png"), images):
        image.save(condition / name)
    (condition / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = TrainConfig.from_dict({**config_of(tmp_path, folder, condition, **SIZE), "schedule": SPLIT})
    trainer = Trainer(config)
    assert trainer.teacher.network_names == tuple(NETWORKS) and trainer.teacher.boundary == 0.9
    assert [trainer.teacher.network_at(t) for t in config.schedule.timesteps[:-1]] == NETWORKS[:1] * 2 + NETWORKS[1:]
    assert trainer.cond[IMAGE_CONDITION].shape == (2, 20, 2, 2, 4) and IMAGE_EMBEDS not in trainer.cond
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    student = Path(result["student"])
    manifest = json.loads((student / MANIFEST).read_text())
    assert manifest["conditions"] == ["image"] and manifest["networks"] == NETWORKS
    assert manifest["task"] == "image-to-video"
    assert manifest["phases"] == ["phase_1/pytorch_lora_weights.safetensors",
                                  "phase_2/pytorch_lora_weights.safetensors"]  # one file per phase, one network

    image, prompt = condition / "dog.png", PROMPTS[1]
    expected = trainer.teacher.sample([prompt], 3, config.schedule, config.student_cfg, trainer.experts,
                                      images=[open_image(image)]).sample
    reloaded = load_student(student).sample([prompt], seed=3, images=[open_image(image)]).sample
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-4)

    out = tmp_path / "student.png"  # the frames side by side: the decoded sample to within PNG rounding
    assert main(["sample", "--student", str(student), "--prompt", prompt, "--image", str(image), "--seed", "3",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 3
    from pdmd.media import as_stills, save_png
    save_png(as_stills(trainer.teacher.decode(expected)), tmp_path / "expected.png")
    ours, theirs = (np.asarray(Image.open(path)).astype(int) for path in (out, tmp_path / "expected.png"))
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1

    # the model card's snippet run as written (an mp4), then stopped before the decode: its latents are the
    # student's from the same image
    code = snippet(str(render_card(student, repo_id=str(student))))
    assert "WanImageToVideoPipeline.from_pretrained" in code and "image=load_image(IMAGE)" in code
    assert 'adapter_name="phase_1")' in code and 'adapter_name="phase_2", load_into_transformer_2=True' in code
    shutil.copyfile(image, tmp_path / "first.png")
    run_snippet(code, tmp_path)
    assert (tmp_path / "student.mp4").stat().st_size > 0
    latent = snippet_latents(code, tmp_path)
    ours = load_student(student).sample([CARD_PROMPT], seed=0, images=[open_image(image)]).sample
    torch.testing.assert_close(latent, ours, rtol=1e-4, atol=1e-4)
    with trainer.roles.active(None):  # the base networks alone
        plain = trainer.teacher.sample([CARD_PROMPT], 0, config.schedule, config.student_cfg,
                                       images=[open_image(image)]).sample
    assert (plain - ours).abs().max() > 1e-3  # the experts learnt something the snippet loads


def test_a_lightning_i2v_pair_samples_as_the_stock_pipeline_with_both_files_loaded(folder, teacher, images,
                                                                                   tmp_path):
    """The published layout (``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` with an ``alpha``, no image
    attention since A14B has none): the high-noise file is phase 1 on ``transformer``, the low-noise one phase 2
    on ``transformer_2``; guidance 1, the student's sigmas."""
    from diffusers import WanImageToVideoPipeline

    high, low = tmp_path / "high_noise_model.safetensors", tmp_path / "low_noise_model.safetensors"
    wan_lightning_file(high, teacher.pipe.transformer, alpha=8.0, seed=1)
    wan_lightning_file(low, teacher.pipe.transformer_2, alpha=2.0, seed=2)
    student = lf.make_published_student(tmp_path / "lightning", [high, low], teacher, LIGHTNING_I2V, cfg=1.0,
                                        teacher_id=str(folder))
    manifest = Manifest.read(student)
    assert manifest.networks == tuple(NETWORKS) and manifest.conditions == ("image",)
    assert manifest.published["layouts"] == ["comfyui"] * 2

    image, prompt = images[0], PROMPTS[0]
    ours = load_student(student).sample([prompt], seed=0, images=[image]).sample
    pipe = with_sigmas(WanImageToVideoPipeline.from_pretrained(str(folder)), list(LIGHTNING_I2V.timesteps[:-1]))
    pipe.load_lora_weights(str(high), adapter_name="high")
    pipe.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    theirs = pipe(image=image, prompt=prompt, num_inference_steps=LIGHTNING_I2V.nfe, guidance_scale=1.0,
                  latents=teacher.noise(1, 0), output_type="latent", **SIZE).frames
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    plain = teacher.sample([prompt], seed=0, schedule=LIGHTNING_I2V, cfg=1.0, images=[image]).sample
    assert (plain - ours).abs().max() > 1e-3  # the files changed the networks

    # a phase boundary on the switch itself puts phase 2's first step (t = 0.9) on transformer: refused, the
    # message naming this teacher's switch (T2V A14B's is 0.875)
    with pytest.raises(lf.LoraFormatError, match=r"phase 2 runs on more than one network \(t=0\.9 on transformer, "
                                                 r".*steps at t >= 0\.9 run the high-noise one\), e\.g\. 0\.895$"):
        lf.make_published_student(tmp_path / "across", [high, low], teacher, PhaseSchedule((0.9,), (2, 2), 5.0))
    assert not (tmp_path / "across").exists()


def test_the_shipped_architecture_plans_the_real_checkpoint(capsys):
    """Both 40-block networks at 36 input channels, switching at 0.9, flow shift 5, no image encoder: the plan's
    meta conditioning holds the prompt and the image condition (16 + 4 channels per latent frame), nothing more."""
    from pdmd.plan.architectures import meta_teacher
    from pdmd.plan.memory import prompt_conditioning

    real = meta_teacher(HUB_ID, height=480, width=832, num_frames=81)
    assert real.network_names == tuple(NETWORKS) and real.boundary == 0.9 and real.default_shift == 5.0
    assert real.image_encoder is None and real.conditions == ("image",)
    assert {real.model[name].config.in_channels for name in NETWORKS} == {36}
    cond, uncond = prompt_conditioning(real, 1)
    assert {key: tuple(value.shape) for key, value in cond.items()} == \
        {"prompt_embeds": (1, 512, 4096), IMAGE_CONDITION: (1, 20, 21, 60, 104)}
    assert uncond.keys() == cond.keys()

    assert main(["plan", "--teacher", HUB_ID, "--height", "64", "--width", "64", "--num-frames", "5",
                 "--gpu-memory", "80", "--json"]) == 0
    names = {row["name"] for row in json.loads(capsys.readouterr().out)["components"]}
    assert {"transformer", "transformer_2", "text encoder 1 (UMT5EncoderModel)", "VAE"} <= names
    assert not any("image encoder" in name for name in names)
