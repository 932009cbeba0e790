"""Wan 2.2 TI2V-5B in text-to-video mode (``WanPipeline`` with ``expand_timesteps``: one timestep per latent token,
the 48-channel Wan 2.2 VAE with spatial compression 16) end to end on the tiny pipeline (pdmd/teachers/tiny.py
``build_wan22_ti2v``): the teacher samples what the pipeline samples, a phased student trains and reloads, and its
diffusers export loads into the stock pipeline and gives the student's latents."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_diffusers_teachers import fresh_accelerator_state  # noqa: F401  (autouse)

from pdmd.cli import main
from pdmd.core.schedule import PhaseSchedule
from pdmd.students.folder import load_student, save_student
from pdmd.students.manifest import LoraSpec
from pdmd.students.roles import Roles, phase_adapter
from pdmd.teachers import TeacherError, load_teacher
from pdmd.teachers.wan import WanTeacher
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

SIZE = {"height": 32, "width": 64, "num_frames": 5}  # latents (48, 2, 2, 4): 2 x 1 x 2 tokens
PROMPTS = ["a red cat on a sofa", "two blue dogs"]
TWO_PHASES = PhaseSchedule((0.6,), (2, 2), 3.0)


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.2-ti2v")


@pytest.fixture(scope="module")
def teacher(folder) -> WanTeacher:
    return load_teacher(str(folder), **SIZE)


def stock_pipeline(folder: Path, sigmas: list[float]):
    """WanPipeline from the folder, its scheduler made to run ``sigmas`` (WanPipeline takes no sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the timesteps are already shifted
    scheduler.set_timesteps = lambda *args, device=None, **kwargs: \
        FlowMatchEulerDiscreteScheduler.set_timesteps(scheduler, sigmas=sigmas, device=device)
    pipe.scheduler = scheduler
    return pipe


# --- (a) the teacher is the pipeline ---------------------------------------------------------------------------
def test_teacher_samples_what_the_ti2v_pipeline_samples(teacher, folder):
    """From the same noise over the same timesteps, guidance on (CFG 3): latents to 1e-4, the 48-channel latent
    at 1/16 of the pixels, the per-token timestep the pipeline builds, decoded frames of the asked size."""
    assert teacher.pipe.config.expand_timesteps and teacher.pipe.vae_scale_factor_spatial == 16
    assert teacher.latent_shape == (48, 2, 2, 4) and teacher.size_multiple() == 32
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    noise = teacher.noise(len(PROMPTS), 0)
    ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0)
    pipe = stock_pipeline(folder, list(schedule.timesteps[:-1]))
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["timestep"]),
                                               with_kwargs=True)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=noise.clone(), output_type="latent",
                  **SIZE).frames
    torch.testing.assert_close(ours.sample, theirs, rtol=1e-4, atol=1e-4)
    assert ours.sample.abs().mean() > 0.1 and ours.nfe == 8
    assert seen[0].shape == (2, 2 * 1 * 2) and bool((seen[0] == seen[0][0, 0]).all())  # one t, every token
    frames = teacher.decode(ours.sample)
    assert frames.shape == (2, 5, 3, 32, 64) and 0 <= frames.min() and frames.max() <= 1
    assert (teacher.default_steps, teacher.default_cfg) == (50, 5.0)
    with pytest.raises(TeacherError, match="multiples of 32"):
        load_teacher(str(folder), height=16, width=64, num_frames=5)


# --- (b) a phased student ----------------------------------------------------------------------------------------
def test_two_phased_updates_then_the_student_reloads_and_samples_the_same(tmp_path, folder):
    config = TrainConfig.from_dict(dict(
        teacher=str(folder), method="phased", schedule={"boundaries": [0.8], "steps": [1, 1]}, updates_per_phase=1,
        batch_size=2, fake_ratio=1, lora={"rank": 2, "alpha": 4}, prompts=PROMPTS + ["a green tree"],
        sample_prompts=PROMPTS[:1], sample_every=2, checkpoint_every=100, lr_generator=1e-2, teacher_cfg=3.0,
        output_dir=str(tmp_path / "run"), **SIZE))
    trainer = Trainer(config)
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 2] and all(r["loss_fake"] > 0 for r in rows)
    expected = trainer.teacher.sample(PROMPTS[:1], 3, config.schedule, config.student_cfg, trainer.experts).sample
    reloaded = load_student(Path(result["student"])).sample(PROMPTS[:1], seed=3).sample
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-5)


# --- (c) diffusers export into the stock pipeline ----------------------------------------------------------------
def test_exported_diffusers_loras_in_the_stock_pipeline_reproduce_the_student(tmp_path, folder, capsys):
    """`lora export --layout diffusers` files, loaded with WanPipeline.load_lora_weights and switched at the phase
    boundary, give the student's latents (student CFG 1: one evaluation a step, guidance_scale 1)."""
    teacher = load_teacher(str(folder), **SIZE)
    roles = Roles(teacher, [phase_adapter(k) for k in range(TWO_PHASES.num_phases)], LoraSpec(rank=2, alpha=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for k in range(TWO_PHASES.num_phases):
            for param in roles.parameters_of(phase_adapter(k)):
                param.normal_(0, 0.3)
    student = tmp_path / "student"
    save_student(student, roles, TWO_PHASES, teacher=teacher.source, method="phased", student_cfg=1.0)
    assert main(["lora", "export", "--student", str(student), "--layout", "diffusers", "--out",
                 str(tmp_path / "export")]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    ours = load_student(student).sample([PROMPTS[0]], seed=0)

    pipe = stock_pipeline(folder, list(TWO_PHASES.timesteps[:-1]))
    for k, path in enumerate(files):
        pipe.load_lora_weights(path, adapter_name=phase_adapter(k))
    pipe.set_adapters(phase_adapter(0))
    boundary = TWO_PHASES.boundary_step_indices[0]

    def switch(pipe, step, timestep, callback_kwargs):
        if step + 1 == boundary:
            pipe.set_adapters(phase_adapter(1))
        return callback_kwargs
    theirs = pipe([PROMPTS[0]], num_inference_steps=len(TWO_PHASES.timesteps) - 1, guidance_scale=1.0, latents=teacher.noise(1, 0),
                  output_type="latent", callback_on_step_end=switch, **SIZE).frames
    torch.testing.assert_close(theirs, ours.sample, rtol=1e-4, atol=1e-4)
    assert ours.nfe == 4
    plain = teacher.sample([PROMPTS[0]], 0, TWO_PHASES, 1.0).sample
    assert not torch.allclose(plain, ours.sample, atol=1e-3)  # the LoRAs change the sample


# --- the real checkpoint's plan, offline -------------------------------------------------------------------------
def test_plan_of_ti2v_5b_answers_offline_from_the_shipped_architecture(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["plan", "--teacher", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "--gpu-memory", "24", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row["bytes"] for row in result["components"]}
    assert rows["transformer"] == pytest.approx(2 * 5.0e9, rel=0.02)  # bf16
