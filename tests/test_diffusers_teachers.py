"""Real teachers through diffusers, on tiny pipelines with random weights (pdmd/teachers/tiny.py): each family
loads by path, samples exactly as its own pipeline does, distils a phased student, and exports and reloads it."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmd.cli import main
from pdmd.core.schedule import PhaseSchedule
from pdmd.students import StudentError
from pdmd.students.folder import LORA_WEIGHT_NAME, load_student, save_student
from pdmd.students.manifest import MANIFEST, LoraSpec
from pdmd.students.roles import Roles, phase_adapter
from pdmd.teachers import TeacherError, load_teacher
from pdmd.teachers.diffusers_base import pack_2x2, unpack_2x2
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.trainer import Trainer

FAMILIES = ("sd3", "flux-dev", "flux-schnell", "wan2.1", "wan2.2", "qwen-image")
SIZES = {"sd3": dict(height=16, width=16), "flux-dev": dict(height=16, width=16),
         "flux-schnell": dict(height=16, width=16), "wan2.1": dict(height=16, width=16, num_frames=5),
         "wan2.2": dict(height=16, width=16, num_frames=5), "qwen-image": dict(height=32, width=32)}
PROMPTS = ["a red cat on a sofa", "two blue dogs"]
# 2 phases, one step each, at t = 1 and t = 0.8: on Wan 2.2 (expert boundary 0.875; a step runs on the expert
# of the t it starts from, as in WanPipeline) phase 1 is the high-noise expert's and phase 2 the low-noise one's
EXPERT_SPLIT = {"boundaries": [0.8], "steps": [1, 1]}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def teacher_of(tiny_pipeline, family):
    return load_teacher(str(tiny_pipeline(family)), **SIZES[family])


def pipeline_latents(teacher, family, schedule: PhaseSchedule, cfg: float, noise):
    """The diffusers pipeline's own sampler from ``noise`` over ``schedule``'s timesteps (plain Euler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = teacher.pipe
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the timesteps are already shifted
    sigmas = list(schedule.timesteps[:-1])
    if family.startswith("wan"):  # WanPipeline takes no sigmas: give its scheduler ours
        scheduler.set_timesteps = lambda *args, device=None, **kwargs: \
            FlowMatchEulerDiscreteScheduler.set_timesteps(scheduler, sigmas=sigmas, device=device)
    pipe.scheduler = scheduler
    packed = family.startswith("flux") or family == "qwen-image"
    kwargs = dict(num_inference_steps=len(sigmas), output_type="latent", latents=pack_2x2(noise) if packed else noise,
                  **SIZES[family])
    if not family.startswith("wan"):
        kwargs["sigmas"] = sigmas
    if family == "flux-schnell":
        kwargs.update(true_cfg_scale=cfg, negative_prompt=[""] * len(PROMPTS))
    elif family == "qwen-image":
        kwargs.update(true_cfg_scale=cfg, negative_prompt=[" "] * len(PROMPTS))
    else:
        kwargs.update(guidance_scale=cfg)
    out = pipe(PROMPTS, **kwargs)
    latents = out.frames if family.startswith("wan") else out.images
    return unpack_2x2(latents, *teacher.latent_shape[1:]) if packed else latents


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_samples_what_its_diffusers_pipeline_samples(tiny_pipeline, family):
    teacher = teacher_of(tiny_pipeline, family)
    cfg = 3.0  # guidance on: plain CFG, FLUX.1-dev's embedded guidance, Qwen-Image's rescaled true CFG
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=cfg)
    reference = pipeline_latents(teacher, family, schedule, cfg, teacher.noise(len(PROMPTS), 0))
    torch.testing.assert_close(ours.sample, reference, rtol=1e-4, atol=1e-4)
    assert ours.sample.abs().mean() > 0.1  # a real sample, not a collapsed one
    assert ours.nfe == 4 * (1 if family == "flux-dev" else 2)

    frames = teacher.decode(ours.sample)
    size = (SIZES[family]["height"], SIZES[family]["width"])
    if family.startswith("wan"):
        assert teacher.is_video and frames.shape == (2, SIZES[family]["num_frames"], 3, *size)
    else:
        assert frames.shape == (2, 3, *size)
    assert 0 <= frames.min() and frames.max() <= 1


def test_guidance_distilled_flux_takes_guidance_as_input_not_a_cfg_pair(tiny_pipeline):
    teacher = teacher_of(tiny_pipeline, "flux-dev")
    cond, uncond = teacher.encode_prompts(PROMPTS[:1])
    assert teacher.guidance_embedded and uncond is None
    x, t = teacher.noise(1, 0), torch.full((1,), 0.6)
    low, high = teacher.with_guidance(teacher.velocity, 1.0), teacher.with_guidance(teacher.velocity, 5.0)
    assert not torch.allclose(low(x, t, cond), high(x, t, cond))


def test_guidance_distilled_flux_takes_one_guidance_per_phase(tiny_pipeline):
    teacher = teacher_of(tiny_pipeline, "flux-dev")
    schedule = PhaseSchedule((0.5,), (1, 1))
    same, per_phase = (teacher.sample(PROMPTS[:1], 0, schedule, cfg).sample for cfg in (5.0, (5.0, 5.0)))
    assert torch.equal(same, per_phase)  # a scale given per phase is the same scale given once
    mixed = teacher.sample(PROMPTS[:1], 0, schedule, (5.0, 1.0))
    assert not torch.equal(mixed.sample, same) and mixed.nfe == 2  # guidance is a network input: 1 evaluation


def tiny_config(tmp_path, family, **overrides) -> dict:
    config = dict(teacher=str(overrides.pop("folder")), method="phased", schedule=EXPERT_SPLIT, updates_per_phase=1,
                  batch_size=2, fake_ratio=1, lora={"rank": 2, "alpha": 2}, prompts=PROMPTS + ["a green tree"],
                  sample_prompts=PROMPTS[:1], sample_every=2, checkpoint_every=100, lr_generator=1e-2,
                  output_dir=str(tmp_path / "run"), **SIZES[family])
    config.update(overrides)
    return config


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "wan2.1", "wan2.2", "qwen-image"])
def test_two_phased_distillation_steps_then_export_and_reload(tmp_path, tiny_pipeline, family):
    config = TrainConfig.from_dict(tiny_config(tmp_path, family, folder=tiny_pipeline(family)))
    trainer = Trainer(config)
    # prompts are encoded once: the text encoders leave the device, borrowed back for the sample grid
    assert all(id(e) in trainer.teacher._offloaded for e in trainer.teacher.text_encoders)
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 2] and all(r["loss_fake"] > 0 for r in rows)
    assert (Path(config.output_dir) / "samples" / "latest.png").is_file()

    folder = Path(result["student"])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]  # the teacher's default
    assert manifest["teacher_options"] == {k: v for k, v in SIZES[family].items()}
    if family == "wan2.2":
        assert manifest["networks"] == ["transformer", "transformer_2"]
    for k, relative in enumerate(manifest["phases"]):
        weights = load_file(str(folder / relative))
        assert weights and all(key.startswith("transformer.") for key in weights)
        assert any(v.abs().sum() > 0 for key, v in weights.items() if ".lora_B." in key), f"phase {k + 1} learned"

    expected = trainer.teacher.sample(PROMPTS[:1], 3, config.schedule, config.student_cfg, trainer.experts).sample
    reloaded = load_student(folder)  # the manifest's teacher, at the resolution it was distilled at
    torch.testing.assert_close(reloaded.sample(PROMPTS[:1], seed=3).sample, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, trainer.teacher.sample(PROMPTS[:1], 3, config.schedule,
                                                               config.student_cfg).sample)


def test_gradient_checkpointing_trains_the_same_adapters_on_both_wan22_experts(tmp_path, tiny_pipeline):
    states = []
    for checkpointing in (False, True):
        config = TrainConfig.from_dict(tiny_config(tmp_path / str(checkpointing), "wan2.2", sample_every=100,
                                                   folder=tiny_pipeline("wan2.2"),
                                                   gradient_checkpointing=checkpointing))
        trainer = Trainer(config)
        trainer.fit(progress=False)
        assert all(m.gradient_checkpointing == checkpointing for m in trainer.teacher.model.values())
        states.append({name: trainer.roles.state_dict(name) for name in ("phase_1", "phase_2")})
    for name, state in states[0].items():
        for key, value in state.items():
            torch.testing.assert_close(states[1][name][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_bf16_and_offload_distil_and_decode(tmp_path, tiny_pipeline):
    config = TrainConfig.from_dict(tiny_config(tmp_path, "wan2.2", folder=tiny_pipeline("wan2.2"), dtype="bf16",
                                               offload=True, gradient_checkpointing=True))
    trainer = Trainer(config)
    assert trainer.teacher.dtype == torch.bfloat16 and trainer.teacher.offload
    result = trainer.fit(progress=False)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert result["finished"] and all(torch.isfinite(torch.tensor(r["loss_generator"])) for r in rows)
    sample = trainer.teacher.sample(PROMPTS[:1], 0, config.schedule, 1.0, trainer.experts).sample
    frames = trainer.teacher.decode(sample)  # the offloaded VAE borrowed for the call
    assert frames.shape == (1, 5, 3, 16, 16) and torch.isfinite(frames).all()
    assert next(trainer.teacher.pipe.vae.parameters()).device.type == "cpu"
    # the manifest keeps what the student is (its resolution), not how this machine held the teacher
    assert load_student(result["student"]).roles.teacher.dtype == torch.float32


def random_student(teacher, schedule: PhaseSchedule, folder: Path, student_cfg: float = 1.0):
    """Phase LoRAs with random weights (as if trained), saved as a student folder; alpha / rank = 2, so export
    has a scale to fold."""
    roles = Roles(teacher, [phase_adapter(k) for k in range(schedule.num_phases)], LoraSpec(rank=2, alpha=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for k in range(schedule.num_phases):
            for param in roles.parameters_of(phase_adapter(k)):
                param.normal_(0, 0.3)
    save_student(folder, roles, schedule, teacher=teacher.source, method="phased", student_cfg=student_cfg)
    return roles


def test_wan22_phase_loras_load_into_the_right_diffusers_transformer(tmp_path, tiny_pipeline):
    """Phase 1 (t = 1) lives in the high-noise expert, phase 2 (t = 0.8 < 0.875) in the low-noise one; diffusers'
    load_lora_weights (load_into_transformer_2 for the second) reproduces each phase's velocity."""
    from diffusers import WanPipeline

    teacher = teacher_of(tiny_pipeline, "wan2.2")
    schedule = PhaseSchedule.from_dict(EXPERT_SPLIT)
    roles = random_student(teacher, schedule, tmp_path / "student")
    manifest = json.loads((tmp_path / "student" / MANIFEST).read_text())
    assert manifest["networks"] == ["transformer", "transformer_2"] and manifest["family"] == "wan"
    assert manifest["phases"] == [f"phase_{k}/{LORA_WEIGHT_NAME}" for k in (1, 2)]

    pipe = WanPipeline.from_pretrained(str(tiny_pipeline("wan2.2")))
    pipe.load_lora_weights(str(tmp_path / "student" / manifest["phases"][0]), adapter_name="phase_1")
    pipe.load_lora_weights(str(tmp_path / "student" / manifest["phases"][1]), adapter_name="phase_2",
                           load_into_transformer_2=True)
    cond, _ = teacher.encode_prompts(PROMPTS[:1])
    x = teacher.noise(1, 0)
    for phase, network, t in ((0, pipe.transformer, 0.95), (1, pipe.transformer_2, 0.4)):
        with torch.no_grad():
            ours = roles.velocity(phase_adapter(phase))(x, torch.full((1,), t), cond)
            theirs = network(hidden_states=x, timestep=torch.full((1,), t * 1000),
                             encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]
            plain = roles.velocity(None)(x, torch.full((1,), t), cond)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ours, plain)


def test_wan22_a_phase_across_the_expert_boundary_saves_one_lora_per_expert(tmp_path, tiny_pipeline):
    from pdmd.students.folder import warn_about_shared_phases

    teacher = teacher_of(tiny_pipeline, "wan2.2")
    schedule = PhaseSchedule.from_dict({"boundaries": [0.5], "steps": [2, 1], "shift": 1.0})  # steps at 1, 0.75
    with pytest.warns(UserWarning, match="phase 1 has steps at t = 1, 0.75, on both networks transformer and "
                                         "transformer_2"):
        warn_about_shared_phases(teacher, schedule)
    random_student(teacher, schedule, tmp_path / "student")
    manifest = json.loads((tmp_path / "student" / MANIFEST).read_text())
    assert manifest["networks"] == [["transformer", "transformer_2"], "transformer_2"]
    assert set(manifest["phases"][0]) == {"transformer", "transformer_2"}
    expected = load_student(tmp_path / "student", teacher_of(tiny_pipeline, "wan2.2")).sample(PROMPTS[:1], seed=1)
    again = load_student(tmp_path / "student").sample(PROMPTS[:1], seed=1)
    torch.testing.assert_close(again.sample, expected.sample)
    plain = teacher.sample(PROMPTS[:1], 1, schedule, 1.0).sample
    assert not torch.allclose(plain, expected.sample)


# --- command line ----------------------------------------------------------------------------------------
def test_cli_samples_teacher_and_student_images_and_videos(tmp_path, tiny_pipeline, capsys):
    sd3 = str(tiny_pipeline("sd3"))
    assert main(["sample", "--teacher", sd3, "--prompt", "a red cat", "--steps", "2", "--seed", "0",
                 "--height", "16", "--width", "16", "--out", str(tmp_path / "teacher.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "teacher.png").size == (16, 16)

    wan = str(tiny_pipeline("wan2.1"))
    video = ["--teacher", wan, "--prompt", "a red cat", "--steps", "2", "--height", "16", "--width", "16",
             "--frames", "5"]
    assert main(["sample", *video, "--out", str(tmp_path / "teacher.gif")]) == 0
    assert Image.open(tmp_path / "teacher.gif").n_frames == 5
    assert main(["sample", *video, "--out", str(tmp_path / "teacher.mp4")]) == 0
    assert (tmp_path / "teacher.mp4").read_bytes()[4:8] == b"ftyp"  # an MP4 container

    teacher = load_teacher(wan, height=16, width=16, num_frames=5)
    random_student(teacher, PhaseSchedule.from_dict(EXPERT_SPLIT), tmp_path / "student")
    capsys.readouterr()
    assert main(["sample", "--student", str(tmp_path / "student"), "--prompt", "a red cat",
                 "--out", str(tmp_path / "student.gif")]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 2
    assert Image.open(tmp_path / "student.gif").size == (16, 16)

    assert main(["sample", "--teacher", sd3, "--prompt", "x", "--height", "16", "--width", "16",
                 "--out", str(tmp_path / "x.gif")]) == 2
    assert "makes images: write a .png" in capsys.readouterr().err


def test_cli_trains_a_config_that_names_a_teacher_folder(tmp_path, tiny_pipeline, capsys):
    import yaml

    config = tiny_config(tmp_path, "sd3", folder=tiny_pipeline("sd3"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["finished"] and (Path(result["student"]) / MANIFEST).is_file()


# --- bad input -------------------------------------------------------------------------------------------
def test_a_hub_id_without_network_asks_for_a_local_folder(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherError, match="could not download nobody-here/no-such-model.*pass a local folder"):
        load_teacher("nobody-here/no-such-model")
    assert main(["sample", "--teacher", "nobody-here/no-such-model", "--prompt", "x", "--out", "x.png"]) == 2


def test_folders_that_hold_no_supported_pipeline_are_named(tmp_path):
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(TeacherError, match="holds a StableDiffusionPipeline, which is not supported; supported "
                                           "pipelines: StableDiffusion3Pipeline, FluxPipeline, WanPipeline, "
                                           "QwenImagePipeline"):
        load_teacher(str(tmp_path / "sd15"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="has no model_index.json"):
        load_teacher(str(tmp_path / "empty"))
    with pytest.raises(TeacherError, match="unknown teacher .*no such folder"):
        load_teacher(str(tmp_path / "missing"))


def test_a_damaged_pipeline_folder_says_what_failed(tmp_path, tiny_pipeline):
    import shutil

    broken = Path(shutil.copytree(tiny_pipeline("sd3"), tmp_path / "sd3"))
    shutil.rmtree(broken / "transformer")
    with pytest.raises(TeacherError, match="could not load StableDiffusion3Pipeline from"):
        load_teacher(str(broken))


def test_a_component_that_needs_a_missing_package_is_one_line_naming_it(tiny_pipeline, monkeypatch):
    import diffusers

    def without_torchvision(*args, **kwargs):  # transformers' words for FLUX.2 [dev]'s PixtralProcessor
        raise ImportError("\nPixtralProcessor requires the Torchvision library but it was not found in your "
                          "environment. Check out the instructions on the\ninstallation page: https://pytorch.org")
    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", without_torchvision)
    with pytest.raises(TeacherError, match="a package it needs is not installed .*Torchvision") as caught:
        load_teacher(str(tiny_pipeline("sd3")))
    assert "\n" not in str(caught.value)


def test_a_lora_whose_keys_match_no_module_lists_them(tmp_path, tiny_pipeline):
    teacher = teacher_of(tiny_pipeline, "sd3")
    schedule = PhaseSchedule.from_dict(EXPERT_SPLIT)
    random_student(teacher, schedule, tmp_path / "student")
    path = tmp_path / "student" / "phase_1" / LORA_WEIGHT_NAME
    weights = load_file(str(path))
    weights["transformer.no_such_block.to_q.lora_A.weight"] = torch.zeros(2, 32)
    save_file(weights, str(path))
    with pytest.raises(StudentError, match="no_such_block.to_q.lora_A"):
        load_student(tmp_path / "student", teacher_of(tiny_pipeline, "sd3"))


def test_a_model_too_big_for_the_device_suggests_the_memory_options(tiny_pipeline, monkeypatch):
    from pdmd.teachers import diffusers_base

    monkeypatch.setattr(diffusers_base, "free_device_memory", lambda device: 1024)
    with pytest.raises(TeacherError, match="GiB are free: load it in bf16.*offload.*gradient_checkpointing"):
        load_teacher(str(tiny_pipeline("sd3")), device="meta")


def test_offload_keeps_text_encoders_and_vae_off_the_device_and_samples_the_same(tiny_pipeline):
    plain = teacher_of(tiny_pipeline, "sd3")
    offloaded = load_teacher(str(tiny_pipeline("sd3")), offload=True, **SIZES["sd3"])
    schedule = PhaseSchedule.uniform(2, 3.0)
    torch.testing.assert_close(offloaded.sample(PROMPTS, 0, schedule).sample, plain.sample(PROMPTS, 0, schedule).sample)


@pytest.mark.parametrize("override, message", [
    ({"dtype": "int8"}, "dtype = 'int8' must be 'fp32', 'bf16' or 'fp16'"),
    ({"offload": "yes"}, "offload = 'yes' must be true or false"),
    ({"height": -16}, "height = -16 must be greater than 0"),
    ({"teacher": "builtin", "height": 64}, "height apply to diffusers teachers"),
])
def test_teacher_loading_options_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_dict({"teacher": "some/folder", **override})


def test_bad_sizes_are_refused_with_the_multiple_needed(tiny_pipeline):
    with pytest.raises(TeacherError, match="multiples of 4"):
        load_teacher(str(tiny_pipeline("sd3")), height=18, width=16)
    with pytest.raises(TeacherError, match="1 \\+ a multiple of 4 frames"):
        load_teacher(str(tiny_pipeline("wan2.1")), height=16, width=16, num_frames=6)
