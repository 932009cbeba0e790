"""Z-Image (``ZImagePipeline``) end to end on the tiny pipeline (pdmd/teachers/tiny.py ``build_z_image``): the teacher
samples what the pipeline samples, a phased student trains and exports, the exported diffusers files load into
the stock pipeline, the ComfyUI files use keys ComfyUI maps, and published Z-Image LoRA layouts import as diffusers
loads them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_card import run_snippet, snippet
from test_diffusers_teachers import fresh_accelerator_state, random_student  # noqa: F401  (autouse)

from pdmd.cli import main
from pdmd.core.schedule import PhaseSchedule
from pdmd.students import lora_formats as lf
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import Manifest
from pdmd.students.roles import phase_adapter
from pdmd.teachers import load_teacher
from pdmd.teachers.z_image import ZImageTeacher, cfg_of_guidance_scale
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

SIZE = dict(height=16, width=16)
PROMPTS = ["a red cat on a sofa", "two blue dogs"]
PROMPT = "a cat sitting on a windowsill"  # the card's example prompt
TWO_PHASES = PhaseSchedule((0.6,), (2, 2), 3.0)


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("z-image")


@pytest.fixture(scope="module")
def teacher(folder) -> ZImageTeacher:
    return load_teacher(str(folder), **SIZE)


def stock_pipeline(folder: Path):
    from diffusers import ZImagePipeline
    return ZImagePipeline.from_pretrained(str(folder))


def linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def pipeline_velocity(transformer, x, t, cond) -> torch.Tensor:
    """A diffusers Z-Image transformer called as ZImagePipeline.__call__ calls it, as a velocity."""
    from pdmd.teachers.z_image import unpad_captions
    with torch.no_grad():
        out = transformer(list(x.unsqueeze(2).unbind(0)), (1000 - t * 1000) / 1000, unpad_captions(cond),
                          return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


# --- (a) the teacher is the pipeline ---------------------------------------------------------------------------
def test_teacher_samples_what_the_zimage_pipeline_samples(teacher, folder):
    """From the same noise, over the pipeline's own timesteps (its scheduler's shift 3, no sigmas given), with
    guidance on (guidance_scale 2 = CFG 3) and off (guidance_scale 0: one evaluation a step): latents to 1e-4,
    and the decoded images too."""
    pipe = stock_pipeline(folder)
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    assert teacher.default_shift == pipe.scheduler.config.shift == 3.0
    noise = teacher.noise(len(PROMPTS), 0)
    for guidance_scale, nfe in ((2.0, 8), (0.0, 4)):
        ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=cfg_of_guidance_scale(guidance_scale))
        # a copy: ZImagePipeline.encode_prompt writes the chat template into the list it is given
        theirs = pipe(list(PROMPTS), num_inference_steps=4, guidance_scale=guidance_scale, latents=noise.clone(),
                      output_type="latent", **SIZE).images
        torch.testing.assert_close(pipe.scheduler.sigmas.tolist(), list(schedule.timesteps), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.sample, theirs, rtol=1e-4, atol=1e-4)
        assert ours.nfe == nfe and ours.sample.abs().mean() > 0.1
    images = pipe(list(PROMPTS), num_inference_steps=4, guidance_scale=2.0, latents=noise.clone(), output_type="pt",
                  **SIZE).images
    decoded = teacher.decode(teacher.sample(PROMPTS, 0, schedule, 3.0).sample)
    assert decoded.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, images, rtol=1e-4, atol=1e-4)
    # the defaults: the pipeline's own call (50 steps, guidance_scale 5), Turbo's model card for a Turbo checkpoint
    assert (teacher.default_steps, teacher.default_cfg) == (50, 6.0)
    turbo = ZImageTeacher(stock_pipeline(folder), "Tongyi-MAI/Z-Image-Turbo", **SIZE)
    assert (turbo.default_steps, turbo.default_cfg) == (8, 1.0)


# --- (b) a phased student, (d) its ComfyUI export -----------------------------------------------------------------
def test_two_phased_updates_then_export_in_both_layouts(tmp_path, folder):
    """Two phases x one update (the real score guided, CFG 3), the student reloads and samples the same; both
    export layouts read back through diffusers' Z-Image converter to the trained deltas times alpha / rank, and
    the ComfyUI file's keys are all ``diffusion_model.<module ComfyUI's Z-Image map covers>.lora_down/up``."""
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
    student_folder = Path(result["student"])
    manifest = Manifest.read(student_folder)
    assert manifest.family == "z-image" and manifest.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    expected = trainer.teacher.sample(PROMPTS[:1], 3, config.schedule, config.student_cfg, trainer.experts).sample
    torch.testing.assert_close(load_student(student_folder).sample(PROMPTS[:1], seed=3).sample, expected,
                               rtol=1e-4, atol=1e-5)

    trained = [{k.removeprefix("transformer."): v for k, v in load_file(str(student_folder / p)).items()}
               for p in manifest.phases]
    for layout in lf.EXPORT_LAYOUTS:
        written = lf.export_student(student_folder, tmp_path / layout, layout)
        assert [p.name for p in written] == [f"run-phase_{k}-{layout}.safetensors" for k in (1, 2)]
        for state, path in zip(trained, written):
            exported = load_file(str(path))
            if layout == "comfyui":  # ComfyUI's Lumina2 branch maps diffusion_model.<diffusers module>
                for key in exported:
                    match = re.fullmatch(r"diffusion_model\.(.+)\.lora_(down|up)\.weight", key)
                    assert match and lf.z_image_comfyui_name(match[1]) == match[1], key
            else:
                assert all(k.startswith("transformer.") and ".lora_" in k for k in exported)
            back = lf.load_published(path, "z-image", trainer.teacher.model)  # diffusers' Z-Image converter
            for module in {lf.PAIR.match(k)["module"] for k in state}:
                up, down = state[f"{module}.lora_B.weight"], state[f"{module}.lora_A.weight"]
                torch.testing.assert_close(back[f"{module}.lora_B.weight"] @ back[f"{module}.lora_A.weight"],
                                           2.0 * up @ down)  # alpha / rank folded in
    with pytest.raises(lf.LoraFormatError, match="not one ComfyUI's Z-Image LoRA loader maps"):
        lf.z_image_comfyui_name("layers.0.attention.qkv")


# --- (c) diffusers export into the stock pipeline, and the card ---------------------------------------------------
def test_exported_diffusers_loras_in_the_stock_pipeline_reproduce_pdmd_sample(tmp_path, folder, capsys):
    """`lora export --layout diffusers` files, loaded with ZImagePipeline.load_lora_weights and switched at the
    phase boundary, give the student's latents; the card's diffusers snippet, run as written (student CFG 2, so
    guidance_scale=1 in the pipeline), gives the image `pdmd sample --student` writes."""
    student = tmp_path / "student"
    # a teacher of its own: Roles adds adapters
    random_student(load_teacher(str(folder), **SIZE), TWO_PHASES, student, student_cfg=2.0)
    assert main(["lora", "export", "--student", str(student), "--layout", "diffusers", "--out",
                 str(tmp_path / "export")]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    ours = load_student(student).sample([PROMPT], seed=0)

    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = stock_pipeline(folder)
    for k, path in enumerate(files):
        pipe.load_lora_weights(path, adapter_name=phase_adapter(k))
    pipe.set_adapters(phase_adapter(0))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the student's timesteps, already shifted
    boundary = TWO_PHASES.boundary_step_indices[0]

    def switch(pipe, step, timestep, callback_kwargs):
        if step + 1 == boundary:
            pipe.set_adapters(phase_adapter(1))
        return callback_kwargs
    theirs = pipe([PROMPT], sigmas=list(TWO_PHASES.timesteps[:-1]), guidance_scale=1.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=switch, **SIZE).images
    torch.testing.assert_close(theirs, ours.sample, rtol=1e-4, atol=1e-4)
    assert ours.nfe == 8

    code = snippet(str(render_card(student, repo_id=str(student))))
    assert "guidance_scale=1," in code and "height=16, width=16" in code
    run_snippet(code, tmp_path)  # writes student.png
    assert main(["sample", "--student", str(student), "--prompt", PROMPT, "--seed", "0",
                 "--out", str(tmp_path / "pdmd.png")]) == 0
    card_image, pdmd_image = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("student.png", "pdmd.png"))
    assert card_image.shape == pdmd_image.shape == (16, 16, 3)
    assert np.abs(card_image - pdmd_image).max() <= 1 and pdmd_image.std() > 5


# --- the real checkpoint's plan, offline -------------------------------------------------------------------------
def test_plan_of_zimage_turbo_answers_offline_from_the_shipped_architecture(capsys, monkeypatch):
    """assets/architectures/Tongyi-MAI--Z-Image-Turbo: the 6.15 B transformer and the Qwen3-4B encoder on the meta
    device, no Hub access; at 1024x1024 on 24 GiB it needs gradient checkpointing."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["plan", "--teacher", "Tongyi-MAI/Z-Image-Turbo", "--gpu-memory", "24", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row["bytes"] for row in result["components"]}
    assert rows["transformer"] == pytest.approx(2 * 6.155e9, rel=0.001)  # bf16
    assert rows["text encoder 1 (Qwen3Model)"] == pytest.approx(2 * 4.022e9, rel=0.001)
    assert result["fits"] is False and result["suggestions"] == ["gradient_checkpointing: true"]


# --- (e) published Z-Image LoRAs in ------------------------------------------------------------------------------
def published_files(model, tmp_path: Path) -> tuple[Path, Path]:
    """A LoRA in each layout published Z-Image LoRAs come in, over every block Linear (attention, feed-forward,
    adaLN): ai-toolkit's ``diffusion_model.<diffusers module>.lora_A/lora_B`` (no alpha), and kohya's
    (sd-scripts, musubi-tuner) ``lora_unet_<module with underscores>.lora_down/lora_up`` with an ``.alpha``."""
    generator = torch.Generator().manual_seed(5)
    blocks = [n for n in linears(model) if n.startswith(("layers.", "noise_refiner.", "context_refiner."))]
    ai_toolkit, kohya = {}, {}
    for name in blocks:
        layer = model.get_submodule(name)
        for state, rank in ((ai_toolkit, 2), (kohya, 4)):
            down = torch.randn(rank, layer.in_features, generator=generator) * 0.3
            up = torch.randn(layer.out_features, rank, generator=generator) * 0.3
            if state is ai_toolkit:
                state[f"diffusion_model.{name}.lora_A.weight"] = down
                state[f"diffusion_model.{name}.lora_B.weight"] = up
            else:
                base = "lora_unet_" + name.replace(".", "_")
                state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"] = down, up
                state[f"{base}.alpha"] = torch.tensor(2.0)
    paths = tmp_path / "zimage_ai_toolkit.safetensors", tmp_path / "zimage_kohya.safetensors"
    save_file(ai_toolkit, str(paths[0]))
    save_file(kohya, str(paths[1]))
    return paths


def test_published_layouts_import_as_the_stock_pipeline_loads_them(tmp_path, teacher, folder, capsys):
    """`pdmd lora import` of an ai-toolkit file (phase 1, strength 1) and a kohya file (phase 2, strength 0.5):
    each phase's velocity equals the stock pipeline's transformer with that file loaded by load_lora_weights at
    that adapter weight."""
    base = stock_pipeline(folder).transformer
    ai_toolkit, kohya = published_files(base, tmp_path)
    assert main(["lora", "import", "--teacher", str(folder), "--files", str(ai_toolkit), str(kohya),
                 "--strengths", "1", "0.5", "--boundaries", "0.6", "--steps", "2, 2", "--height", "16", "--width",
                 "16", "--out", str(tmp_path / "student")]) == 0
    capsys.readouterr()
    manifest = Manifest.read(tmp_path / "student")
    assert manifest.published["layouts"] == ["comfyui", "kohya"] and manifest.family == "z-image"
    student = load_student(tmp_path / "student")
    cond, _ = student.roles.teacher.encode_prompts(PROMPTS[:1])
    x, t = teacher.noise(1, 4), torch.tensor([0.7])
    plain = pipeline_velocity(base, x, t, cond)
    for phase, (path, strength) in enumerate(((ai_toolkit, 1.0), (kohya, 0.5))):
        pipe = stock_pipeline(folder)
        pipe.load_lora_weights(str(path), adapter_name="published")
        pipe.set_adapters("published", adapter_weights=strength)
        theirs = pipeline_velocity(pipe.transformer, x, t, cond)
        with torch.no_grad():
            mine = student.experts[phase](x, t, cond)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mine, plain, atol=1e-3)
    assert main(["sample", "--student", str(tmp_path / "student"), "--prompt", PROMPT,
                 "--out", str(tmp_path / "published.png")]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 4

    # ComfyUI's own fused-qkv names have no diffusers converter: refused, the keys named, nothing dropped
    qkv = base.get_submodule("layers.0.attention.to_q")
    save_file({"diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.zeros(2, qkv.in_features),
               "diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.zeros(3 * qkv.out_features, 2)},
              str(tmp_path / "fused.safetensors"))
    with pytest.raises(lf.LoraFormatError, match=r"match no module.*layers\.0\.attention\.qkv\.lora_A"):
        lf.load_published(tmp_path / "fused.safetensors", "z-image", base)
